"""The ``archive`` command: torch-model-archiver's flags, with the same meanings and defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from archiver.build import ARCHIVE_FORMATS, build_archive, target_path
from archiver.commands.options import force_option, key_file_option
from archiver.manifest import RUNTIMES

# Inputs at least this big get a progress bar, when stderr is a terminal.
PROGRESS_MIN_BYTES = 50 * 1000 * 1000


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--model-name",
    required=True,
    metavar="NAME",
    help="Name of the model; the archive is <export-path>/<model-name>.mar. "
    "Letters, digits, '_', '-' and '.', starting with a letter or digit.",
)
@click.option(
    "--serialized-file",
    type=click.Path(dir_okay=False),
    help="The weights: a TorchScript .pt, a torch.export .pt2, an eager state_dict .pt/.pth, .onnx, ...",
)
@click.option(
    "--model-file", type=click.Path(dir_okay=False), help="Python file defining the model class (eager)."
)
@click.option(
    "--handler",
    required=True,
    metavar="HANDLER",
    help="A built-in handler (image_classifier, object_detector, image_segmenter, text_classifier), "
    "a handler .py file, or file[.py]:function.",
)
@click.option(
    "--extra-files",
    metavar="FILES",
    help="Comma-separated files, folders or globs to add. A file lands at the archive root; "
    "a folder's contents land at the root, sub-folders kept.",
)
@click.option(
    "--runtime",
    default="python",
    show_default=True,
    type=click.Choice(RUNTIMES),
    help="Runtime the model runs on (LSP is TorchServe's C++ backend, not supported here).",
)
@click.option(
    "--export-path",
    default=None,
    metavar="DIR",
    help="Folder to write the archive into (created if missing).  [default: current folder]",
)
@click.option(
    "--archive-format",
    default="default",
    show_default=True,
    type=click.Choice(list(ARCHIVE_FORMATS)),
    help="default: deflated zip .mar (weights stored); zip-store: uncompressed .mar; "
    "tgz: <name>.tar.gz; no-archive: a folder <name>/.",
)
@force_option("Overwrite an existing archive of the same name.")
@click.option(
    "-v",
    "--version",
    "model_version",
    required=True,
    metavar="VERSION",
    help="The model's version, stored as modelVersion (this tool's own version: --about).",
)
@click.option(
    "-r",
    "--requirements-file",
    type=click.Path(dir_okay=False),
    help="requirements.txt with the model's Python dependencies.",
)
@click.option(
    "-c",
    "--config-file",
    type=click.Path(dir_okay=False),
    help="model-config.yaml (batchSize, maxBatchDelay, workers, handler settings); checked before archiving.",
)
@key_file_option(
    "--sign-key", "Sign the archive with this EC private key once written: <archive>.sig (see 'sign --help')."
)
def archive(
    model_name: str,
    serialized_file: str | None,
    model_file: str | None,
    handler: str,
    extra_files: str | None,
    runtime: str,
    export_path: str | None,
    archive_format: str,
    force: bool,
    model_version: str,
    requirements_file: str | None,
    config_file: str | None,
    sign_key: str | None,
) -> None:
    """Package a model's files into a TorchServe .mar (the same flags as torch-model-archiver)."""
    export_dir = export_path if export_path is not None else os.getcwd()
    inputs = [serialized_file, model_file, *(extra_files or "").split(",")]
    big = sum(_size(p) for p in inputs if p)
    bar_wanted = sys.stderr.isatty() and big >= PROGRESS_MIN_BYTES
    kwargs = dict(
        model_name=model_name,
        version=model_version,
        handler=handler,
        serialized_file=serialized_file,
        model_file=model_file,
        extra_files=extra_files,
        runtime=runtime,
        export_path=export_dir,
        archive_format=archive_format,
        force=force,
        requirements_file=requirements_file,
        config_file=config_file,
    )
    existed = _exists(target_path(export_dir, model_name, archive_format))
    if sign_key:
        from archiver.signing_keys import check_private_key, require_signing_extra

        require_signing_extra()
        check_private_key(Path(sign_key))  # a bad key fails before the archive is written
    if bar_wanted:
        with click.progressbar(length=big, label=f"archiving {model_name}", file=sys.stderr) as bar:
            written = build_archive(**kwargs, on_progress=bar.update)
    else:
        written = build_archive(**kwargs)
    if existed:
        click.echo(f"overwrote {written}", err=True)
    click.echo(str(written))
    if sign_key:
        from archiver.commands.sign import sign_after_build

        click.echo(str(sign_after_build(Path(written), sign_key)))


def _size(path: str) -> int:
    p = Path(path.strip())
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return 0


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
