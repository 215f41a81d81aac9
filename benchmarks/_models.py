"""The two models every serving benchmark uses, archived by our archiver into .mar files both servers
load: ResNet34 (random weights: none can be downloaded, and speed does not depend on them) behind a
TorchServe-style handler, and a tiny Linear 4->2 with JSON rows that measures a server's own cost."""

from __future__ import annotations

import shutil
from pathlib import Path

RESNET_HANDLER = '''
"""ResNet34 handler in TorchServe's style: batched decode + ImageNet preprocessing, top-1 answer."""
import io

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler

TRANSFORM = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


class ResnetHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") or row.get("body")
            images.append(TRANSFORM(Image.open(io.BytesIO(payload)).convert("RGB")))
        return torch.stack(images)

    def postprocess(self, out):
        probs = torch.softmax(out, dim=1)
        score, index = probs.max(dim=1)
        return [{"index": int(i), "score": float(s)} for i, s in zip(index, score)]
'''

TINY_HANDLER = '''
"""Tiny JSON model: [4 floats] in, [2 floats] out, batched."""
import os

import torch

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "tiny.pt"))
    if not data:
        return None
    rows = [row.get("body") if row.get("body") is not None else row.get("data") for row in data]
    with torch.inference_mode():
        out = _model(torch.tensor(rows, dtype=torch.float32))
    return out.tolist()
'''


def build_models(out: Path, resnet_batch: int, tiny_batch: int, delay_ms: int) -> dict[str, Path]:
    """ResNet34 and the tiny model as .mar files (built by our archiver), each with its batching config."""
    import torch
    import torchvision

    from archiver.build import build_archive

    work = out / "work"
    store = out / "store"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet34(weights=None).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(resnet, torch.rand(1, 3, 224, 224)), work / "resnet34.pt")
    tiny = torch.nn.Linear(4, 2).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(tiny, torch.rand(1, 4)), work / "tiny.pt")
    (work / "resnet_handler.py").write_text(RESNET_HANDLER)
    (work / "tiny_handler.py").write_text(TINY_HANDLER)
    mars = {}
    for name, handler, weights, batch in [
        ("resnet34", "resnet_handler.py", "resnet34.pt", resnet_batch),
        ("tiny", "tiny_handler.py", "tiny.pt", tiny_batch),
    ]:
        config = work / f"{name}-config.yaml"
        # no minWorkers: the worker split is the server's own default (calibration), as a user gets it
        config.write_text(f"batchSize: {batch}\nmaxBatchDelay: {delay_ms}\n")
        mars[name] = build_archive(
            model_name=name,
            version="1.0",
            handler=str(work / handler),
            serialized_file=str(work / weights),
            config_file=str(config),
            export_path=str(store),
        )
    return mars
