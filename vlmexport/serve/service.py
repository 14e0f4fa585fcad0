"""The captioning behind POST /caption: a thread pool sized to the cores and a bounded queue.

ONNX Runtime releases the GIL while it runs, and one session may run on several threads at
once, so the workers share one `Captioner` per variant (one copy of the weights) and each
session runs single-threaded: `workers` captions at once use `workers` cores without
oversubscribing them. Beyond `workers + queue` requests waiting or running, a request is
answered 503 with a Retry-After at once instead of piling up (the server this replaced
queued without bound: p95 1.03 s at concurrency 16 for a 45 ms caption).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.runtime.captioner import Caption, Captioner
from vlmexport.serve import images
from vlmexport.serve.fields import Limits
from vlmexport.serve.problems import RequestError


@dataclass(frozen=True)
class Settings:
    """What the server accepts and how much work it takes on."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = images.MAX_PIXELS
    max_beams: int = 4
    max_new_tokens: int | None = None  # None: the model's max_length
    workers: int = 0  # 0: one per core
    queue: int | None = None  # requests waiting beyond the running ones; None: 8 per worker
    client_timeout: float = 30.0  # to send a whole request, head and body
    parse_timeout: float = 1.0  # to parse a multipart form

    @property
    def pool_size(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def queue_size(self) -> int:
        return 8 * self.pool_size if self.queue is None else self.queue


class CaptionService:
    """Captioners per variant (fp32 opened at start, others on first use) and the pool they run on.

    Raises (on construction):
        BundleError: no bundle, or its fp32 graphs cannot be loaded.
        CheckpointError: the bundle's tokenizer or preprocessing file is unreadable.
    """

    def __init__(self, onnx_dir: Path, settings: Settings) -> None:
        self.onnx_dir = onnx_dir
        self.settings = settings
        self.workers = settings.pool_size
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.captioners: dict[str, Captioner] = {}
        self.lock = threading.Lock()
        self.limits = Limits(settings.max_new_tokens or self.captioner("fp32").max_length, settings.max_beams)
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="vlmexport-caption")
        self.capacity = self.workers + settings.queue_size
        self.pending = 0  # waiting or running; only touched on the event loop's thread
        self.mean_seconds = 0.1  # a running mean of caption time, for Retry-After

    def captioner(self, variant: str) -> Captioner:
        """Raises: BundleError for a variant the bundle does not have."""
        with self.lock:  # concurrent first requests open a variant once
            if variant not in self.captioners:
                self.captioners[variant] = Captioner(self.onnx_dir, variant, threads=self.threads)
            return self.captioners[variant]

    def caption(self, data: bytes, variant: str, options: DecodeOptions) -> Caption:
        """Decode and caption one upload (on a worker thread).

        Raises: RequestError (broken image), BundleError (variant), ImageError.
        """
        started = time.perf_counter()
        try:
            image = images.decode(data, self.settings.max_pixels)
            return self.captioner(variant).caption_details([image], options)[0]
        finally:
            # A running mean (a float store; a lost update between threads only ages it a little).
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - started)

    async def submit(self, data: bytes, variant: str, options: DecodeOptions) -> Caption:
        """`caption` on the pool, or a 503 at once when the queue is full.

        Raises: RequestError (503 busy, or from `caption`), BundleError, ImageError.
        """
        if self.pending >= self.capacity:
            wait = math.ceil(self.pending * self.mean_seconds / self.workers)
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"busy: {self.pending} captions are running or queued",
                f"retry in {max(wait, 1)} s",
                {"Retry-After": str(max(wait, 1))},
            )
        self.pending += 1
        try:
            return await asyncio.wrap_future(self.executor.submit(self.caption, data, variant, options))
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
