"""Helpers of the serving tests: a real server on a loopback port in a thread, raw HTTP calls.

``ServerThread`` runs an aiohttp application with ``AppRunner`` + ``TCPSite`` on port 0 in its
own thread and event loop, so tests can drive it with blocking clients (the official ``openai``
client) or with ``asyncio.run`` + raw aiohttp, exactly as external clients would.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig

# Small, fast defaults for every test server: the reference semantics are the same as the CLI's
# except for sizes (passages cut to 64 tokens, 16-token queries).
TEST_ENGINE_CONFIG = EngineConfig(
    model="tiny",
    generation=GenerationConfig(stride=2, query_len=16, max_new_tokens=16, passage_tokens=64),
    speculation=SpeculationConfig(prefetch=20),
)
MODEL = "tiny"
# the chat endpoint needs a chat template: the real default model, short answers and passages
CHAT_ENGINE_CONFIG = EngineConfig(
    model="smollm2",
    generation=GenerationConfig(stride=2, query_len=16, max_new_tokens=12, passage_tokens=64),
    speculation=SpeculationConfig(prefetch=20),
)
CHAT_MODEL = "smollm2"


class ServerThread:
    """An aiohttp app served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: Any):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="test-server")
        self._runner = None

    def _main(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the server's loop (to read its state safely)."""
        fut = asyncio.run_coroutine_threadsafe(_acall(fn, *args), self.loop)
        return fut.result(30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


async def _acall(fn, *args):
    return fn(*args)


async def http(method: str, url: str, body: Any = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One raw aiohttp request: (status, parsed JSON or text)."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        kw: dict[str, Any] = {"headers": headers or {}}
        if raw is not None:
            kw["data"] = raw
        elif body is not None:
            kw["json"] = body
        async with s.request(method, url, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


def request(method: str, url: str, body: Any = None, **kw) -> tuple[int, Any]:
    return asyncio.run(http(method, url, body, **kw))


def slow_body_answer(url: str, path: str, wait_s: float) -> tuple[bytes, float, bool]:
    """POST ``path`` with headers promising 1000 bytes and only 10 of them sent, the connection
    kept open: (everything the server sent until it closed the connection or ``wait_s`` passed,
    seconds until the first byte of its answer, whether the server closed the connection)."""
    import socket
    import time
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        t = time.perf_counter()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                     + b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
        sock.settimeout(wait_s)
        got, first, closed = b"", None, False
        try:
            while chunk := sock.recv(65536):
                first = first if first is not None else time.perf_counter() - t
                got += chunk
            closed = True
        except TimeoutError:
            pass
    return got, first if first is not None else float("inf"), closed
