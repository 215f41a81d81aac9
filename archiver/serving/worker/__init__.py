"""What runs handlers: the worker's main loop, archive loading, isolated imports, user-frame tracebacks.

Used by worker processes, Ray and KServe replicas and ``predict``; never by the front process.
"""
