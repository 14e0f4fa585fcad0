"""`bench`: PyTorch eager and each ONNX variant side by side, on one image, a fixed token count.

Each backend is measured in its own freshly spawned interpreter, one after the other, so its
peak RSS (VmHWM) is its own and no backend runs while another is being timed. Times
are medians over `repeats` runs after one warm-up run. Decoding ignores EOS: exactly
`tokens` tokens are generated, so every backend does the same work.

The per-token lower bound is what a decode step cannot beat on this machine: it must read
every decoder weight once (the tied head included), so bound = decoder weight bytes /
memory read bandwidth, measured by reducing a 256 MB array on all threads (a decode step
reads weights; a copy's read + write rate, STREAM's convention, is another quantity). On the
shared 2-core machine this was written on, it varied between runs (42–66 GB/s), so compare
the ratio of one run.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmexport.errors import UsageError

TORCH = "pytorch"
BANDWIDTH_BYTES = 256 << 20


@dataclass(frozen=True)
class BackendBench:
    """One backend's numbers (times in ms unless named _s; sizes in MB)."""

    backend: str
    load_s: float
    vision_ms: float  # vision encoder + projection
    first_pass_ms: float  # the prefix through the decoder, cache filled
    decode_ms: float  # one cached step, median over the steps
    caption_ms: float  # pixels → `tokens` tokens
    peak_rss_mb: float
    base_rss_mb: float  # after imports, before loading: peak − base is what the model costs
    size_mb: float  # files on disk: the variant's graphs, or the checkpoint's weights
    decoder_mb: float  # weight bytes one decode step reads
    bound_ms: float = 0.0  # decoder_mb / bandwidth
    speedup: float = 0.0  # PyTorch caption_ms / caption_ms
    # vision + first pass + (tokens − 1) × bound: the caption if every decode step ran at the
    # bandwidth bound — what no work on the decode step can beat, the two 196-row stages as measured.
    floor_ms: float = 0.0
    vs_fp32: float = 0.0  # ONNX fp32's caption_ms / caption_ms (0 when fp32 was not measured)
    floor_vs_fp32: float = 0.0  # ONNX fp32's caption_ms / floor_ms: the most the decode step can give


@dataclass(frozen=True)
class BenchReport:
    """Every backend's row and the conditions they were measured under."""

    rows: list[BackendBench]
    tokens: int
    prefix_length: int
    threads: int
    bandwidth_gbs: float
    load_average: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))


def run_bench(
    onnx_dir: Path,
    model_dir: Path,
    variants: list[str] | None = None,
    tokens: int = 30,
    repeats: int = 3,
    threads: int | None = None,
    isolate: bool = True,
) -> BenchReport:
    """Measure PyTorch eager (LoRA merged) and each ONNX variant; see the module docstring.

    `isolate=False` measures in this process (faster, for tests; peak RSS is then shared).

    Raises:
        UsageError: tokens or repeats < 1, or a checkpoint whose config.json names another model
            than the bundle's (checked before anything runs).
        BundleError: no bundle, or a variant it does not have (checked before anything runs).
        CheckpointError: the checkpoint cannot be loaded.
    """
    from vlmexport.bundle.manifest import read_manifest

    if tokens < 1 or repeats < 1:
        raise UsageError("--tokens and --repeats must be at least 1", "pass positive numbers")
    manifest = read_manifest(Path(onnx_dir))
    variants = variants or ["fp32"]
    for variant in variants:
        manifest.component_file("vision_encoder", variant)  # raises for a variant the bundle lacks
    _same_model(manifest.model, Path(model_dir))
    threads = threads or os.cpu_count() or 1
    jobs: list[tuple[Callable[..., BackendBench], tuple[Any, ...]]] = [(measure_torch, (Path(model_dir), tokens, repeats, threads))]
    jobs += [(measure_onnx, (Path(onnx_dir), variant, tokens, repeats, threads)) for variant in variants]
    before = memory_bandwidth(threads=threads)
    rows = [_run(job, args, isolate) for job, args in jobs]
    bandwidth = max(before, memory_bandwidth(threads=threads))  # the machine's best: load varies over a run
    return BenchReport(derive(rows, tokens, bandwidth), tokens, int(manifest.model["prefix_length"]), threads, bandwidth / 1e9, os.getloadavg())


def derive(rows: list[BackendBench], tokens: int, bandwidth: float) -> list[BackendBench]:
    """The measured rows (PyTorch's first) with what follows from them: each decode step's bound
    at `bandwidth` (bytes/s), the caption floor, and the speed-ups against PyTorch and ONNX fp32.

    Why the floor: a speed target for a variant (issue #12: int8's caption 1.8× fp32's) can be
    out of reach of anything done to its decode step, when its vision encoder and 196-row first
    pass alone take most of the time budget; `floor_vs_fp32` says so from one run."""
    fp32 = next((r.caption_ms for r in rows if r.backend == "onnx fp32"), 0.0)
    derived = []
    for r in rows:
        bound = r.decoder_mb * 1e6 / bandwidth * 1e3
        floor = r.vision_ms + r.first_pass_ms + (tokens - 1) * bound
        derived.append(replace(r, bound_ms=bound, speedup=rows[0].caption_ms / r.caption_ms, floor_ms=floor, vs_fp32=fp32 / r.caption_ms, floor_vs_fp32=fp32 / floor))
    return derived


def _same_model(facts: dict[str, Any], model_dir: Path) -> None:
    """Refuse a checkpoint whose config names another model than the bundle's manifest, before
    anything is measured: the speed-ups would compare two different models. Read off config.json
    alone (loading the weights here would cost what the isolated PyTorch run then measures).

    Raises:
        CheckpointError: no readable distilvit config.json in `model_dir`.
        UsageError: the families, layer count or width differ.
    """
    from transformers import AutoConfig

    from vlmexport.checkpoint.config import read_config

    config = read_config(model_dir)
    text = AutoConfig.for_model(**config.text_config)  # num_hidden_layers/hidden_size whatever the family calls them
    found = {"vision_type": config.vision_type, "text_type": config.text_type, "num_layers": text.num_hidden_layers, "embed_dim": text.hidden_size}
    differ = [f"{key} {facts.get(key)} vs {value}" for key, value in found.items() if facts.get(key) != value]
    if differ:
        raise UsageError(
            f"--model-dir {model_dir} is not the model the bundle was exported from (bundle vs checkpoint: {', '.join(differ)})",
            "pass the checkpoint the bundle was exported from",
        )


def _run(job: Callable[..., BackendBench], args: tuple[Any, ...], isolate: bool) -> BackendBench:
    if not isolate:
        return job(*args)
    # spawn, not fork: a fresh interpreter, so peak RSS and thread pools start from nothing.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet) as pool:
        return pool.submit(job, *args).result()


def _quiet() -> None:
    # The child's stderr is the user's terminal: library deprecation warnings are noise there.
    warnings.filterwarnings("ignore")


def memory_bandwidth(threads: int = 1, nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Bytes per second read from memory by `threads` at once (a bitwise-or reduction of a large
    array, which does next to no arithmetic per byte); best of `repeats`."""
    data = np.ones(nbytes // 8, np.uint64)
    bounds = np.linspace(0, data.size, threads + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:]))
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while reducing
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda c: np.bitwise_or.reduce(data[c[0] : c[1]]), chunks))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB. Linux's VmHWM belongs to the process image (reset by exec);
    ru_maxrss would carry over the peak of the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _step_ms(step: Callable[[np.ndarray], np.ndarray], first_token: np.ndarray, tokens: int) -> float:
    """Median ms of the cached steps of one greedy run of `tokens` tokens."""
    token, times = first_token, []
    for _ in range(max(tokens - 1, 1)):
        started = time.perf_counter()
        token = step(token)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure_onnx(onnx_dir: Path, variant: str, tokens: int, repeats: int, threads: int) -> BackendBench:
    """One ONNX variant: the runtime's own loop (`runtime.generate`), EOS ignored."""
    from vlmexport.bundle.decoding import DecodeOptions
    from vlmexport.bundle.preprocess import bundle_preprocessor
    from vlmexport.exporter.onnx_io import initializer_bytes
    from vlmexport.runtime.bundle import open_bundle
    from vlmexport.runtime.generate import generate
    from vlmexport.samples import sample_images

    base = _peak_rss_mb()
    started = time.perf_counter()
    bundle = open_bundle(onnx_dir, variant, threads)
    load_s = time.perf_counter() - started
    preprocessor = bundle_preprocessor(onnx_dir)
    pixels = preprocessor(sample_images(1, preprocessor.height))
    prefix = bundle.prefix(pixels)
    vision_ms = _median_ms(lambda: bundle.prefix(pixels), repeats)
    first_ms = _median_ms(lambda: bundle.first_pass(prefix), repeats)
    logits, past = bundle.first_pass(prefix)
    state = {"past": past}

    def step(token: np.ndarray) -> np.ndarray:
        logits, state["past"] = bundle.step(token, state["past"])
        return logits[:, -1].argmax(-1)[:, None]

    decode_ms = _step_ms(step, logits[:, -1].argmax(-1)[:, None], tokens)
    options = DecodeOptions(max_new_tokens=tokens)
    caption_ms = _median_ms(lambda: generate(bundle, bundle.prefix(pixels), options, None, None), repeats)
    peak = _peak_rss_mb()  # before reading the decoder graph below, which would add to it
    manifest = bundle.manifest
    from vlmexport.bundle.manifest import decoder_graphs

    step_graph = manifest.variants[variant][decoder_graphs(manifest.layout)[1]]
    decoder_bytes = initializer_bytes(onnx_dir / step_graph)
    size = manifest.variant_bytes(variant)
    return BackendBench(f"onnx {variant}", load_s, vision_ms, first_ms, decode_ms, caption_ms, peak, base, size / 1e6, decoder_bytes / 1e6)


def measure_torch(model_dir: Path, tokens: int, repeats: int, threads: int) -> BackendBench:
    """PyTorch eager, LoRA merged (the fastest form of the model PyTorch offers without compiling):
    transformers' `generate` with its own cache, EOS suppressed for exactly `tokens` tokens."""
    import torch
    from transformers import DynamicCache, GenerationConfig

    from vlmexport.checkpoint.load import WEIGHTS_NAME, load_checkpoint
    from vlmexport.checkpoint.merge import merged_model
    from vlmexport.samples import sample_images

    torch.set_num_threads(threads)
    base = _peak_rss_mb()
    started = time.perf_counter()
    checkpoint = load_checkpoint(model_dir)
    model = merged_model(checkpoint.model) if checkpoint.model.has_lora else checkpoint.model
    load_s = time.perf_counter() - started
    lm = model.causal_lm
    pixels = torch.as_tensor(checkpoint.preprocessor(sample_images(1, checkpoint.preprocessor.height)))
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1, eos_token_id=checkpoint.tokenizer.eos_token_id, pad_token_id=checkpoint.tokenizer.pad_token_id)
    with torch.inference_mode():
        prefix = model.prefix_embeddings(pixels)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long)

        def first_pass() -> Any:
            return lm(inputs_embeds=prefix, attention_mask=mask, cache=DynamicCache(config=lm.config), use_cache=True, logits_to_keep=1)

        vision_ms = _median_ms(lambda: model.prefix_embeddings(pixels), repeats)
        first_ms = _median_ms(first_pass, repeats)
        out = first_pass()
        cache = out.cache

        def step(token: np.ndarray) -> np.ndarray:
            length = cache.get_seq_length() + 1
            logits = lm(input_ids=torch.as_tensor(token), attention_mask=torch.ones(1, length, dtype=torch.long), cache=cache, use_cache=True).logits
            return logits[:, -1].argmax(-1)[:, None].numpy()

        decode_ms = _step_ms(step, out.logits[:, -1].argmax(-1)[:, None].numpy(), tokens)

        def caption() -> Any:
            embeds = model.prefix_embeddings(pixels)
            return model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)

        caption_ms = _median_ms(caption, repeats)
    decoder_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in lm.parameters()}.values())
    size = (Path(model_dir) / WEIGHTS_NAME).stat().st_size
    return BackendBench(TORCH, load_s, vision_ms, first_ms, decode_ms, caption_ms, _peak_rss_mb(), base, size / 1e6, decoder_bytes / 1e6)
