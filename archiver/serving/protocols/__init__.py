"""Codecs and records every host shares (no aiohttp, no torch): TorchServe's parts, the wire frames, OIP."""
