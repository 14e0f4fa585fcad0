"""`vlmexport serve`: the Starlette app (app.py) on uvicorn, bound and ready to serve.

`make_server` binds the socket itself, so a busy port is a one-line error before anything
runs and port 0's pick is known at once (`server.url`); `serve_forever` runs uvicorn on it in
the calling thread, `shutdown` stops it from another.

Slow and idle clients: uvicorn closes a keep-alive connection idle for `timeout_keep_alive`,
but it arms that timer only after a first response, and any byte received disarms it, so a
connection that sends nothing, or a request head one byte at a time, was held forever (20
idle connections, 300 slow ones: all held). `ClientTimeoutProtocol` gives every request head
`client_timeout` seconds from the connection (or the previous response) to arrive whole; the
body's deadline is the app's (408).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlmexport.bundle.manifest import read_manifest, verify_files
from vlmexport.errors import UsageError
from vlmexport.serve.app import NODE_MODULES, VENDOR, WEB_DIR, create_app
from vlmexport.serve.hosts import host_policy
from vlmexport.serve.service import CaptionService, Settings

__all__ = ["VENDOR", "Settings", "VlmServer", "make_server"]
BACKLOG = 1024  # the server this replaced listened with 5 and reset 24 of 50 connections at concurrency 64
MAX_CONNECTIONS = 1000  # beyond it uvicorn answers 503 at once


class ClientTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring)."""

    client_timeout = 30.0  # set per server by a subclass made in `make_server`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._head_deadline is None:
                self._arm()  # a new cycle began in there (the body of a request answered early ended)
        elif self._head_deadline is not None:
            self._head_deadline.cancel()  # the head is in: the app times the body
            self._head_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.client_timeout, self._expire)

    def _expire(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class VlmServer:
    """A bound server: `serve_forever()` in one thread, `shutdown()` from another."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, service: CaptionService) -> None:
        self.server = uvicorn.Server(config)
        self.socket = sock
        self.service = service
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self.warnings: list[str] = []
        self._done = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        shown = "localhost" if host in ("127.0.0.1", "::1") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.service.close()


def make_server(
    onnx_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda line: None,
    allowed_hosts: Iterable[str] = (),
) -> VlmServer:
    """A server for the bundle in `onnx_dir`, bound and ready for `serve_forever()`; port 0 picks
    a free port (see `server.url`). `server.warnings` lists what the demo page will lack.

    Raises:
        BundleError: no bundle (or no manifest) in `onnx_dir`, a file that differs from its manifest
            sha256, or fp32 graphs that do not load.
        CheckpointError: the bundle's tokenizer or preprocessing file is unreadable.
        UsageError: a setting out of range, or the address cannot be listened on.
    """
    onnx_dir = Path(onnx_dir)
    settings = settings or Settings()
    # python-multipart logs a warning per malformed form, with bytes of it; the access log already
    # records each refusal, once, escaped.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    if settings.workers < 0 or settings.queue_size < 0 or settings.max_beams < 1 or settings.client_timeout <= 0:
        raise UsageError("--workers, --queue must be ≥ 0, --max-beams ≥ 1 and --client-timeout > 0", "pass values in range")
    # Once, before listening: the files the runtime loads and the page fetches are the ones the
    # manifest hashed (browsers check the hashes too, and a changed graph would caption wrong).
    verify_files(onnx_dir, read_manifest(onnx_dir))
    sock = _bind(host, port)
    try:
        service = CaptionService(onnx_dir, settings)
    except BaseException:
        sock.close()
        raise
    protocol = type("ServerProtocol", (ClientTimeoutProtocol,), {"client_timeout": settings.client_timeout})
    config = uvicorn.Config(
        create_app(service, host_policy(host, allowed_hosts), log),
        http=protocol,
        lifespan="off",
        access_log=False,  # the app logs each request with control characters escaped
        log_config=None,
        log_level="warning",
        server_header=False,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        backlog=BACKLOG,
    )
    server = VlmServer(config, sock, service)
    if not (WEB_DIR / "demo.html").is_file():
        server.warnings.append(f"{WEB_DIR} is missing: the demo page needs a source checkout of vlmexport (POST /caption works)")
    elif not all(root.is_dir() for root in VENDOR.values()):
        server.warnings.append(f"{NODE_MODULES} lacks onnxruntime-web or @huggingface/tokenizers: run web/install-deps.sh (or `npm ci` in web/) for the demo page")
    return server


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv6 if the host is an IPv6 address).

    Raises:
        UsageError: the address cannot be listened on.
    """
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "pick another --host") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "pick another --port (0 picks a free one) or --host") from exc
    sock.set_inheritable(True)
    return sock
