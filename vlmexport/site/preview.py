"""A plain static file server over a site folder, as a host without header control serves it:
Python's own `http.server` in a child process, no COOP/COEP, its request log kept. What the tests
and bench/web_bench.py serve a `vlmexport site` folder with (the service worker must do the rest)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def static_server(folder: Path, log: Path) -> Iterator[str]:
    """`python3 -m http.server` over `folder` on a free localhost port; yields its URL, request log in `log`."""
    with socket.socket() as probe:  # a free port; another process taking it in between would only fail this run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(folder)], stdout=sink, stderr=sink)
        try:
            for _ in range(200):
                with socket.socket() as attempt, contextlib.suppress(OSError):
                    attempt.connect(("127.0.0.1", port))
                    break
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/"
        finally:
            server.terminate()
            server.wait(10)
