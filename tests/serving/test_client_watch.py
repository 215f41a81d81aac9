"""The client watch on the inference routes (front/client_watch.py), over real HTTP on 127.0.0.1: a request
whose client stays gets its answer and leaves nothing for the garbage collector (a timer per request once
kept every finished request alive in a reference cycle, most of the front's CPU per request), and a
client that leaves has its work cancelled within a sweep or two."""

from __future__ import annotations

import asyncio
import gc

import aiohttp
from aiohttp import web

from archiver.serving.front import event_loop
from archiver.serving.front.client_watch import POLL_S, ClientGone, while_connected


async def _served(handler: web.RequestHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/work", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/work"


def test_answered_requests_leave_no_reference_cycles_behind() -> None:
    async def story() -> int:
        async def answer(request: web.Request) -> web.Response:
            async def work() -> bytes:
                await asyncio.sleep(0)
                return b"done"

            return web.Response(body=await while_connected(request, work()))

        runner, url = await _served(answer)
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(5):  # the first requests make what every later one reuses
                    async with session.post(url, data=b"x") as resp:
                        assert await resp.read() == b"done"
                gc.collect()
                gc.disable()
                try:
                    for _ in range(200):
                        async with session.post(url, data=b"x") as resp:
                            assert await resp.read() == b"done"
                    return gc.collect()
                finally:
                    gc.enable()
        finally:
            await runner.cleanup()

    # on the server's own event loop; aiohttp's client makes a few cycles of its own, the timer per request
    # (a closure that re-armed itself by its own name) made thousands
    assert event_loop.run(story()) < 50


def test_a_client_that_leaves_has_its_work_cancelled() -> None:
    async def story() -> str:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def answer(request: web.Request) -> web.Response:
            try:
                await while_connected(request, asyncio.sleep(30))
            except ClientGone:
                outcome.set_result("cancelled: the client left")
                return web.Response(status=499)
            outcome.set_result("ran to its end")
            return web.Response()

        runner, url = await _served(answer)
        try:
            async with aiohttp.ClientSession() as session:
                try:
                    async with asyncio.timeout(0.2):
                        await session.post(url, data=b"x")
                except TimeoutError:
                    pass  # the client gives up and closes its connection
            async with asyncio.timeout(10 * POLL_S):
                return await outcome
        finally:
            await runner.cleanup()

    assert event_loop.run(story()) == "cancelled: the client left"
