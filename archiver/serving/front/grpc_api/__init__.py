"""gRPC on the front process: TorchServe's inference and management APIs, the Open Inference Protocol,
health and reflection, as grpc.aio servers on the server's own event loop (``server.py``)."""

import os

# Workers start by fork and exec, so gRPC's fork handlers have nothing to do; left on, they log a line
# each time a worker starts while a call is in flight. Set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
