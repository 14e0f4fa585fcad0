"""Support for test_serve.py and test_web.py: a `vlmexport serve` server on a free localhost port
in a thread, and the rule for tools the web tests need (skip locally, fail in CI)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vlmexport.serve.server import VlmServer, make_server


@contextmanager
def running_server(onnx_dir: Path, **kwargs: Any) -> Iterator[VlmServer]:
    """A server for `onnx_dir` on 127.0.0.1 (a free port), serving until the block ends."""
    server = make_server(onnx_dir, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def require(present: bool, what: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail under CI=true, where
    web/install-deps.sh must have installed it, so the web tests never go unrun silently."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing in CI: `make test` runs web/install-deps.sh first, which installs it")
    pytest.skip(f"{what} is missing: run web/install-deps.sh to run this test")
