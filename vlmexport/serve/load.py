"""A small concurrent HTTP client for load tests of `vlmexport serve` (bench/serve_bench.py and
the test suite): N requests from C threads, each answer's status, latency and server time.

Standard library only (http.client on threads): a load generator must not share the event
loop or the connection pool it is measuring, and 64 blocking clients are plenty for loopback.
"""

from __future__ import annotations

import http.client
import io
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

BOUNDARY = "vlmexport-load-boundary"


@dataclass(frozen=True)
class Answer:
    """One request's outcome: status 0 and `error` set when the connection failed."""

    status: int
    seconds: float  # as the client saw it
    server_ms: float | None  # the Server-Timing header's app duration
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    answers: list[Answer]
    seconds: float
    concurrency: int

    @property
    def errors(self) -> list[str]:
        return [a.error for a in self.answers if a.error]

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for a in self.answers:
            counts[a.status] = counts.get(a.status, 0) + 1
        return counts

    def percentile(self, q: float, status: int = 200) -> float:
        """Client-side latency (s) of the answers with `status`, at quantile q in [0, 1]."""
        times = sorted(a.seconds for a in self.answers if a.status == status)
        if not times:
            return float("nan")
        return times[min(len(times) - 1, round(q * (len(times) - 1)))]

    @property
    def throughput(self) -> float:
        """200 answers per second of wall time."""
        return sum(a.status == 200 for a in self.answers) / self.seconds

    def server_median_ms(self) -> float:
        values = [a.server_ms for a in self.answers if a.status == 200 and a.server_ms is not None]
        return statistics.median(values) if values else float("nan")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]], boundary: str = BOUNDARY) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body and its Content-Type header."""
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def send(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 60) -> Answer:
    """One request on a fresh connection; a connection failure is an Answer with `error`, not an exception."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        return Answer(response.status, time.perf_counter() - started, _server_ms(answer_headers), answer_headers, data)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, time.perf_counter() - started, None, error=f"{exc.__class__.__name__}: {exc}")
    finally:
        connection.close()


def caption_load(url: str, images: list[bytes], requests: int, concurrency: int, fields: dict[str, str] | None = None) -> LoadResult:
    """`requests` POST /caption of `images` (round robin) from `concurrency` threads at once."""
    bodies = [multipart(fields or {}, {"image": ("image.png", data)}) for data in images]

    def one(i: int) -> Answer:
        body, headers = bodies[i % len(bodies)]
        return send(url, "POST", "/caption", body, headers)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(requests)))
    return LoadResult(answers, time.perf_counter() - started, concurrency)


def _server_ms(headers: dict[str, str]) -> float | None:
    timing = headers.get("server-timing", "")
    for item in timing.split(","):
        name, _, duration = item.strip().partition(";dur=")
        if name == "app":
            try:
                return float(duration)
            except ValueError:
                return None
    return None


class ServerProcess:
    """`vlmexport serve` in its own process on a free port, its URL read from what it prints;
    its RSS and peak RSS readable (a load test must not measure its own memory)."""

    def __init__(self, onnx_dir: Path, *options: str) -> None:
        command = [sys.executable, "-m", "vlmexport", "serve", "--onnx-dir", str(onnx_dir), "--port", "0", "--quiet", *options]
        import psutil  # the [export] extra's (tests and bench use this class; the server does not)

        # stderr to a file, not a pipe: nobody reads it during a load test, and a full pipe
        # would stall the server's logging and with it the server.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        match = re.search(r"(http://localhost:\d+)/", line)
        if not match:
            self.process.kill()
            self.process.wait(10)
            self.stderr.seek(0)
            raise RuntimeError(f"the server did not start: {line!r} {self.stderr.read()}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ps = psutil.Process(self.process.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def reset_peak(self) -> bool:
        """Reset the kernel's peak RSS (VmHWM) of the server; False where that is not allowed."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """Peak RSS in bytes since the start or the last `reset_peak` (Linux)."""
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{self.process.pid}/status").read_text())
        return int(found.group(1)) * 1024 if found else self.rss()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.stderr.close()
