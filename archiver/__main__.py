"""``python -m archiver`` runs the same CLI as the ``model-archiver`` script."""

from archiver.cli import main

main()
