"""model-archiver: build, read, verify and test-serve TorchServe-compatible .mar archives.

The names a build script needs are re-exported here. They load on first use, so that ``import archiver``
(and the CLI's ``--help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "export_model": "archiver.export",
    "build_archive": "archiver.build",
    "open_archive": "archiver.reader",
    "ArchiveReader": "archiver.reader",
    "ReadLimits": "archiver.reader",
    "VerifyReport": "archiver.reader",
    "Manifest": "archiver.manifest",
    "FileRecord": "archiver.manifest",
    "ModelConfig": "archiver.config",
    "parse_model_config": "archiver.config",
    "load_model_config": "archiver.config",
    "errors": "archiver.errors",
    "serving": "archiver.serving",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'archiver' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
