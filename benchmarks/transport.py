"""Benchmark: which transport should carry request bodies from the asyncio front to a worker process?

    .venv/bin/python benchmarks/transport.py           # full run, well under a minute
    .venv/bin/python benchmarks/transport.py --quick   # a tenth of the iterations, a few seconds

Why: the server's front (one asyncio process) hands each request batch to a worker process and gets the
answers back. The bodies range from a 200 B JSON field to a 6.5 MB upload (the server's max request
size), so the choice between a plain stream and shared memory for the bodies depends on what each
costs per round trip at each size. This script measures that cost on the machine it runs on; it needs
nothing beyond the standard library (no torch).

Each transport gets its own worker, a real separate process started with subprocess.Popen (exec, no
fork-without-exec), which stays up for the whole run:

  socketpair  AF_UNIX SOCK_STREAM socketpair. Front: asyncio StreamReader/StreamWriter from
              asyncio.open_unix_connection(sock=...). Worker: blocking socket, recv_into a preallocated
              bytearray, answers written with sendmsg.
  pipe        two os.pipe pairs (default pipe capacity). Front: asyncio streams over
              loop.connect_read_pipe / connect_write_pipe. Worker: blocking os.readv into the same kind
              of preallocated bytearray (os.read would allocate a new bytes object per chunk, which
              would charge the pipe for an allocation the socket worker does not make), os.writev back.
  shm         one multiprocessing.shared_memory.SharedMemory segment created by the front at start-up,
              sized for the largest body. Per request the front copies the body into it and sends only
              the frame's header over a socketpair (as above); the answer comes back on that socketpair.
              The worker maps the segment from /dev/shm itself (Linux): attaching with SharedMemory
              would, before Python 3.13, register the segment with a resource tracker in the worker,
              which unlinks it when the worker exits.

Frame (both directions): struct '!II' (header length, payload length), a small JSON header, then the
payload. One request is one frame; a batch of 32 bodies is one frame whose header lists the 32 lengths.
Each worker turns every body into a bytes object (what a handler receives) - from its receive buffer,
or from the shared memory - and answers with about 200 B per body (a small JSON header plus padding), so
each round trip includes the same real work on every transport. The front writes an iteration number
into the first 8 bytes of each request, the worker echoes it, and the front checks it (and the byte
count), so a transport cannot pass by answering stale data.

Timing: one request in flight at a time; round trip = from the front starting to send until it has the
whole answer (for shm, the copy into the segment is included: it is part of that design's cost). The
iterations of each case are split into rounds and the order of the transports rotates between rounds so
slow drift on the machine does not favour one of them. Reported: median and p99 round trip in µs,
throughput (body bytes / median round trip, MB = 10^6 B) and the median's ratio to the socketpair's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import mmap
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory

PREFIX = struct.Struct("!II")
MAX_BODY = 6_500_000  # the server's max request size
MAX_HEADER = 4096
ANSWER_SIZE = 200  # bytes of answer frame per body
TAG = slice(0, 8)
TRANSPORTS = ("socketpair", "pipe", "shm")

# Everything the front starts, so that stop() can end it whatever failed and where.
CHILDREN: list[subprocess.Popen[bytes]] = []
SEGMENTS: list[shared_memory.SharedMemory] = []


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]  # one entry per body in the frame
    iterations: int
    big: bool = False  # report throughput

    @property
    def total(self) -> int:
        return sum(self.sizes)


CASES = (
    Case("200 B", (200,), 2000),
    Case("4 KB", (4096,), 2000),
    Case("32 x 200 B", (200,) * 32, 2000),
    Case("100 KB", (100_000,), 1000, big=True),
    Case("1 MB", (1_000_000,), 500, big=True),
    Case("6.5 MB", (MAX_BODY,), 300, big=True),
)


# --------------------------------------------------------------------------------------------- worker


def answer_frame(request_id: int, received: int, tag: int, bodies: int) -> list[bytes]:
    """The worker's answer: ~ANSWER_SIZE bytes per body, as prefix, header and padding buffers."""
    header = json.dumps({"id": request_id, "n": received, "tag": tag}).encode()
    pad = b"x" * max(0, ANSWER_SIZE * bodies - PREFIX.size - len(header))
    return [PREFIX.pack(len(header), len(pad)), header, pad]


def serve(
    read_into: Callable[[memoryview], int],
    write: Callable[[list[bytes]], int],
    shm_view: memoryview | None,
) -> None:
    """Worker loop: read a frame, materialise each body as bytes, answer; return on EOF."""
    buf = bytearray(PREFIX.size + MAX_HEADER + MAX_BODY)
    view = memoryview(buf)

    def read_exactly(mv: memoryview) -> bool:
        got = 0
        while got < len(mv):
            n = read_into(mv[got:])
            if n == 0:
                return False
            got += n
        return True

    def write_all(parts: list[bytes]) -> None:
        sent = write(parts)
        if sent < sum(map(len, parts)):  # a short write: finish from the joined frame
            rest = b"".join(parts)
            while sent < len(rest):
                sent += write([rest[sent:]])

    while True:
        if not read_exactly(view[: PREFIX.size]):
            return
        hlen, plen = PREFIX.unpack_from(buf)
        if not read_exactly(view[PREFIX.size : PREFIX.size + hlen + plen]):
            return
        header = json.loads(bytes(view[PREFIX.size : PREFIX.size + hlen]))
        start = PREFIX.size + hlen
        source = view[start : start + plen] if shm_view is None else shm_view
        offset = 0
        received = 0
        tag = -1
        for length in header["lengths"]:
            body = bytes(source[offset : offset + length])  # what a handler would get
            if tag < 0:
                tag = int.from_bytes(body[TAG], "big")
            offset += length
            received += len(body)
        write_all(answer_frame(header["id"], received, tag, len(header["lengths"])))


def worker_main(args: argparse.Namespace) -> None:
    if args.worker in ("socketpair", "shm"):
        sock = socket.socket(fileno=args.fd)
        sock.setblocking(True)
        shm_view = None
        if args.worker == "shm":
            fd = os.open(f"/dev/shm/{args.shm_name}", os.O_RDONLY)
            try:
                mapping = mmap.mmap(fd, args.shm_size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            shm_view = memoryview(mapping)
        serve(sock.recv_into, sock.sendmsg, shm_view)
    else:
        serve(lambda mv: os.readv(args.rfd, [mv]), lambda parts: os.writev(args.wfd, parts), None)


# ---------------------------------------------------------------------------------------------- front


@dataclass
class Link:
    """The front's end of one transport: its worker, streams and (for shm) the segment."""

    name: str
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    shm: shared_memory.SharedMemory | None = None
    closers: list[Callable[[], object]] = field(default_factory=list)
    samples: dict[str, list[int]] = field(default_factory=dict)

    async def round_trip(self, request_id: int, body: bytearray, lengths: list[int]) -> tuple[int, int]:
        """Send one frame, wait for its answer; returns (bytes the worker saw, tag it read)."""
        header = json.dumps({"id": request_id, "lengths": lengths}).encode()
        if self.shm is None:
            self.writer.write(PREFIX.pack(len(header), len(body)) + header)
            self.writer.write(body)
        else:
            self.shm.buf[: len(body)] = body
            self.writer.write(PREFIX.pack(len(header), 0) + header)
        await self.writer.drain()
        hlen, plen = PREFIX.unpack(await self.reader.readexactly(PREFIX.size))
        answer = await self.reader.readexactly(hlen + plen)
        reply = json.loads(answer[:hlen])
        if reply["id"] != request_id:
            raise RuntimeError(f"{self.name}: answer {reply['id']} to request {request_id}")
        return reply["n"], reply["tag"]


def spawn(argv: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *argv], pass_fds=pass_fds)
    CHILDREN.append(proc)
    return proc


def open_socketpair(name: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = spawn([name, "--fd", str(back.fileno()), *extra], (back.fileno(),))
    except BaseException:
        front.close()
        raise
    finally:
        back.close()
    return proc, front


async def start(name: str, links: list[Link]) -> None:
    """Start one transport's worker and append its Link (so the caller's finally can stop it)."""
    loop = asyncio.get_running_loop()
    if name == "socketpair":
        proc, sock = open_socketpair(name, [])
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        links.append(Link(name, proc, reader, writer))
    elif name == "shm":
        shm = shared_memory.SharedMemory(create=True, size=MAX_BODY)
        SEGMENTS.append(shm)
        proc, sock = open_socketpair(name, ["--shm-name", shm.name.lstrip("/"), "--shm-size", str(MAX_BODY)])
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        links.append(Link(name, proc, reader, writer, shm))
    else:
        to_worker_r, to_worker_w = os.pipe()
        to_front_r, to_front_w = os.pipe()
        try:
            proc = spawn(
                [name, "--rfd", str(to_worker_r), "--wfd", str(to_front_w)], (to_worker_r, to_front_w)
            )
        except BaseException:
            os.close(to_worker_w)
            os.close(to_front_r)
            raise
        finally:
            os.close(to_worker_r)
            os.close(to_front_w)
        reader = asyncio.StreamReader()
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(to_front_r, "rb", buffering=0)
        )
        write_transport, write_protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(to_worker_w, "wb", buffering=0),
        )
        writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
        links.append(Link(name, proc, reader, writer, closers=[read_transport.close]))


async def stop(links: list[Link]) -> None:
    """Close the front ends (EOF makes each worker return), then wait for, or kill, every worker."""
    for link in links:
        try:
            link.writer.close()
            for close in link.closers:
                close()
            await asyncio.wait_for(link.writer.wait_closed(), 2)
        except Exception:
            pass  # a broken transport is closed anyway; the worker is killed below if it is still up
    for proc in CHILDREN:
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for segment in SEGMENTS:
        segment.close()
        segment.unlink()


async def measure(link: Link, case: Case, body: bytearray, count: int, first_id: int) -> list[int]:
    """count round trips of one case on one transport; each sample in ns."""
    lengths = list(case.sizes)
    out = []
    for i in range(first_id, first_id + count):
        body[TAG] = i.to_bytes(8, "big")
        t0 = time.perf_counter_ns()
        received, tag = await link.round_trip(i, body, lengths)
        out.append(time.perf_counter_ns() - t0)
        if received != case.total or tag != i:
            raise RuntimeError(f"{link.name} {case.name}: worker saw {received} B, tag {tag}, expected {i}")
    return out


def percentile(sorted_ns: list[int], q: float) -> float:
    index = max(0, min(len(sorted_ns) - 1, math.ceil(q * len(sorted_ns)) - 1))  # nearest rank
    return sorted_ns[index] / 1000


def median(sorted_ns: list[int]) -> float:
    n = len(sorted_ns)
    mid = n // 2
    return (sorted_ns[mid] if n % 2 else (sorted_ns[mid - 1] + sorted_ns[mid]) / 2) / 1000


async def run(quick: bool) -> None:
    scale = 10 if quick else 1
    rounds = 4
    links: list[Link] = []
    started = time.perf_counter()
    try:
        for name in TRANSPORTS:
            await start(name, links)
        request_id = 0
        for case in CASES:
            body = bytearray(os.urandom(case.total))
            iterations = max(rounds * 10, case.iterations // scale)
            warmup = max(5, iterations // 20)
            for link in links:
                await measure(link, case, body, warmup, request_id)
                request_id += warmup
                link.samples[case.name] = []
            per_round = -(-iterations // rounds)
            for r in range(rounds):
                for k in range(len(links)):
                    link = links[(k + r) % len(links)]
                    link.samples[case.name] += await measure(link, case, body, per_round, request_id)
                    request_id += per_round
    finally:
        await stop(links)
    elapsed = time.perf_counter() - started
    report(links, elapsed, quick)


def report(links: list[Link], elapsed: float, quick: bool) -> None:
    print(
        f"transport round trips, front (asyncio) -> worker process -> front; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
        f"{', --quick' if quick else ''}"
    )
    print(f"answer: ~{ANSWER_SIZE} B per body; one request in flight; {elapsed:.1f} s in all\n")
    head = (
        f"{'case':<11} {'transport':<11} {'iters':>6} {'median µs':>10} {'p99 µs':>10} {'MB/s':>8} "
        f"{'vs sock':>8}"
    )
    print(head)
    print("-" * len(head))
    base = {case.name: median(sorted(links[0].samples[case.name])) for case in CASES}
    for case in CASES:
        for link in links:
            ns = sorted(link.samples[case.name])
            med = median(ns)
            mbps = f"{case.total / med:8.0f}" if case.big else f"{'':>8}"
            print(
                f"{case.name:<11} {link.name:<11} {len(ns):>6} {med:>10.1f} {percentile(ns, 0.99):>10.1f} "
                f"{mbps} {med / base[case.name]:>7.2f}x"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    parser.add_argument("--worker", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rfd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wfd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shm-name", help=argparse.SUPPRESS)
    parser.add_argument("--shm-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
    else:
        asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
