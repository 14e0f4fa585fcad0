"""`caption --images DIR --output captions.jsonl`: a folder of images, one worker process per core.

Each worker holds one `Captioner` with single-threaded sessions (processes, not threads: the
decoding loop's numpy bookkeeping holds the GIL between ONNX Runtime calls). Lines are written
as batches finish, flushed one by one, so an interrupted run keeps everything it captioned;
run again, it skips the images already in the output (a line cut by the interruption, and the
lines of images that failed, are dropped first and their images tried again). Each caption line
records the variant and the decoding options that made it, so a rerun with others is refused
rather than finishing the file with captions of two kinds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import read_manifest
from vlmexport.bundle.preprocess import IMAGE_SUFFIXES, image_names
from vlmexport.errors import BundleError, ImageError, UsageError, VlmExportError
from vlmexport.fsutil import atomic_file
from vlmexport.runtime.captioner import Captioner, to_image

BATCH = 8
Line = dict[str, str | list[int]]


@dataclass(frozen=True)
class FolderReport:
    """What one run did: images captioned now, skipped (already in the output), failed."""

    output: Path
    captioned: int
    skipped: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image, error)
    seconds: float = 0.0
    workers: int = 1


def caption_folder(
    onnx_dir: Path | str,
    images_dir: Path | str,
    output: Path | str,
    variant: str = "fp32",
    options: DecodeOptions | None = None,
    workers: int = 0,
    batch_size: int = BATCH,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> FolderReport:
    """Caption every image under `images_dir` into the JSON Lines file `output`, one
    {"image": path relative to the folder, "caption", "tokens", "variant", "decoding"} per line
    (or {"image", "error"} for an image that cannot be read), in the order batches finish;
    "decoding" holds the DecodeOptions that differ from greedy's defaults. `on_progress(done, total)` after each batch.

    Raises:
        UsageError: no such folder, no images in it, an output path that cannot be written, or an
            output whose captions were made with another variant or other decoding options.
        BundleError: no bundle, or a variant it lacks (checked before any worker starts).
    """
    images_dir, output = Path(images_dir), Path(output)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir} is not a folder", "pass a folder of image files")
    if output.is_dir() or not output.resolve().parent.is_dir():
        raise UsageError(f"--output {output} is a folder or its folder does not exist", "pass a file path such as captions.jsonl in an existing folder")
    read_manifest(Path(onnx_dir)).component_file("vision_encoder", variant)  # raises for a missing bundle or variant
    names = image_names(images_dir)
    if not names:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}", "pass the folder that holds the images")
    options = options or DecodeOptions()
    made_with = settings(variant, options)
    done = resume(output, made_with)
    todo = [name for name in names if name not in done]
    if not todo:
        on_progress(len(names), len(names))
        return FolderReport(output, 0, len(names))
    workers = max(1, min(workers or os.cpu_count() or 1, -(-len(todo) // batch_size)))
    started, failures, captioned = time.perf_counter(), [], 0
    on_progress(len(names) - len(todo), len(names))
    with output.open("a", encoding="utf-8") as sink:
        for lines in _run(Path(onnx_dir), images_dir, todo, variant, options, workers, batch_size):
            for line in lines:
                if "caption" in line:
                    line = {**line, **made_with}
                sink.write(json.dumps(line, ensure_ascii=False) + "\n")
                if "error" in line:
                    failures.append((str(line["image"]), str(line["error"])))
                else:
                    captioned += 1
            sink.flush()
            on_progress(len(names) - len(todo) + captioned + len(failures), len(names))
    return FolderReport(output, captioned, len(names) - len(todo), failures, time.perf_counter() - started, workers)


def settings(variant: str, options: DecodeOptions) -> dict[str, Any]:
    """What a caption line records of how it was made: the variant, and the decoding options
    that differ from the defaults (greedy: none)."""
    defaults = asdict(DecodeOptions())
    return {"variant": variant, "decoding": {k: v for k, v in asdict(options).items() if v != defaults[k]}}


def resume(output: Path, made_with: dict[str, Any] | None = None) -> set[str]:
    """Images the output already captions. A cut last line and the lines of failed images are
    dropped (the file rewritten whole), so their images are captioned again. With `made_with`
    (settings()), a caption line made otherwise is refused; lines without the record (written
    before lines had one) are taken as they are.

    Raises:
        UsageError: the file is not JSON Lines of this command, or holds captions made otherwise.
    """
    if not output.exists():
        return set()
    kept, done, changed = [], set(), False
    text = output.read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(keepends=True), 1):
        if not raw.endswith("\n"):
            changed = True  # cut by an interruption
            continue
        try:
            line = json.loads(raw)
            image = line["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--output {output} line {number} is not a line this command writes", "pass a new file, or the output of an earlier run") from None
        if "caption" in line:
            theirs = {key: line[key] for key in (made_with or {}) if key in line}
            if made_with is not None and theirs and theirs != made_with:
                raise UsageError(
                    f"--output {output} line {number} was captioned with {_described(theirs)}, this run asks for {_described(made_with)}",
                    "pass a new --output, or the --variant and decoding flags of that run",
                )
            kept.append(raw)
            done.add(image)
        else:
            changed = True
    if changed:
        with atomic_file(output) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
    return done


def _described(made_with: dict[str, Any]) -> str:
    decoding = ", ".join(f"{k}={v}" for k, v in sorted(made_with.get("decoding", {}).items())) or "greedy defaults"
    return f"variant {made_with.get('variant')} ({decoding})"


def _run(onnx_dir: Path, folder: Path, names: list[str], variant: str, options: DecodeOptions, workers: int, batch_size: int) -> Iterator[list[Line]]:
    """Lines per batch as batches finish: in this process for one worker, else on a process pool
    with at most two batches per worker in flight (a million images are not submitted at once)."""
    batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
    if workers == 1:
        _start_worker(onnx_dir, variant, options, threads=None)
        for batch in batches:
            yield _caption_batch(folder, batch)
        return
    # spawn, not fork: ONNX Runtime's thread pools do not survive a fork.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(onnx_dir, variant, options, 1)) as pool:
            pending: set[Future[list[Line]]] = set()
            for batch in batches:
                pending.add(pool.submit(_caption_batch, folder, batch))
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
    except BrokenProcessPool as exc:
        # A worker's initializer failed (a graph ONNX Runtime refuses, a missing tokenizer): the
        # pool only says it broke, so open the captioner here to raise the real one-line error.
        _start_worker(onnx_dir, variant, options, threads=1)
        raise BundleError(f"a captioning worker stopped on {onnx_dir} ({exc})", "run again with --workers 1 to see why") from exc


_WORKER: list[Captioner] = []  # the worker process's captioner, set once by its initializer


def _start_worker(onnx_dir: Path, variant: str, options: DecodeOptions, threads: int | None) -> None:
    _WORKER[:] = [Captioner(onnx_dir, variant, threads=threads, options=options)]


def _caption_batch(folder: Path, names: list[str]) -> list[Line]:
    """One line per image: its caption, or the error that stopped it (the others still captioned)."""
    captioner = _WORKER[0]
    opened: dict[str, Image.Image] = {}
    lines: dict[str, Line] = {}
    for name in names:
        try:
            opened[name] = to_image(folder / name)
        except ImageError as exc:
            lines[name] = {"image": name, "error": exc.problem}
    try:
        results = captioner.caption_details(list(opened.values()))
    except VlmExportError as exc:
        results = []
        lines |= {name: {"image": name, "error": exc.problem} for name in opened}
    for name, result in zip(opened, results):
        lines[name] = {"image": name, "caption": result.text, "tokens": result.tokens}
    return [lines[name] for name in names]
