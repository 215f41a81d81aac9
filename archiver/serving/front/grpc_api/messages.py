"""The gRPC services' message classes, from the committed descriptors in a private descriptor pool.

A private pool, not protobuf's default one: tritonclient and KServe register their own messages under
the same proto package (``inference``) in the default pool, and two registrations of one name in one
pool fail (``duplicate symbol 'inference.ServerLiveRequest'``). Here each message class comes from
``message_factory.GetMessageClass`` over our pool, and the services are registered by their wire names,
so our server, tritonclient and KServe live in one process. ``descriptors.binpb`` is made from
``protos/`` by ``build_descriptors.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

TORCHSERVE_INFERENCE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
TORCHSERVE_MANAGEMENT = "org.pytorch.serve.grpc.management.ManagementAPIsService"
OPEN_INFERENCE = "inference.GRPCInferenceService"
# TorchServe's name for the same service (its open_inference_grpc.proto; messages identical on the wire)
TORCHSERVE_OPEN_INFERENCE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
_DESCRIPTORS = Path(__file__).with_name("descriptors.binpb")


@functools.cache
def pool() -> descriptor_pool.DescriptorPool:
    """Our own pool holding every file of ``descriptors.binpb`` (imports first, as protoc lists them)."""
    found = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(_DESCRIPTORS.read_bytes())
    for file in files.file:
        found.Add(file)
    return found


@functools.cache
def message(full_name: str) -> Any:
    """The message class of ``full_name`` (``inference.ModelInferRequest``)."""
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def service(full_name: str) -> Any:
    """The service descriptor of ``full_name``: its methods, their message types, which stream."""
    return pool().FindServiceByName(full_name)
