"""`check`: prove that a bundle says what its reference says — integrity first, then every
component at batch 1 and batch 3, then whole captions.

The reference is the PyTorch checkpoint when one is given (components against the merged
model the bundle was exported from; captions against the un-merged LoRA model, the true
reference), otherwise the bundle's own fp32 variant — how `quantize` verifies a new variant.
Both are `Runner`s, so one set of comparisons serves both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import (
    VARIANTS,
    Manifest,
    decoder_graphs,
    projection_in_vision,
    read_manifest,
    verify_files,
)
from vlmexport.bundle.preprocess import IMAGE_SUFFIXES, Preprocessor, bundle_preprocessor, open_image
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.merge import forced_positions, merge_measurements, merged_model
from vlmexport.errors import BundleError, ImageError, UsageError
from vlmexport.exporter.graphs import decoder_shape
from vlmexport.exporter.onnx_io import signature
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.generate import greedy
from vlmexport.runtime.runner import Runner
from vlmexport.samples import sample_images
from vlmexport.validate.metrics import (
    KNIFE_EDGE,
    Measurement,
    centered,
    clear_top1,
    cosine,
    kl_divergence,
    knife_edges,
    present_values,
    rel_max,
    rel_mean,
    top2_margin,
)
from vlmexport.validate.portable import host_cpu, portability
from vlmexport.validate.profiles import HIGHER_IS_BETTER, Profile, TensorBounds, merge_bounds, profile_named
from vlmexport.validate.reference import TorchRunner
from vlmexport.validate.report import CaptionResult, CheckReport
from vlmexport.validate.smoke import decode_passes

T = TypeVar("T")
DEFAULT_IMAGES = 4  # bundled samples: two shapes, a gradient and noise (see samples.sample_images)
BATCHES = (1, 3)
DECODE_STEPS = 3
# Images per end-to-end chunk: bounds memory (teacher-forced logits are batch × tokens × vocabulary).
CAPTION_BATCH = 8
MERGE_NOTE = (
    "merged vs LoRA (PyTorch): the merged model teacher-forced along the LoRA model's greedy tokens on the "
    "check images, under the [merge] bounds (compare_models' criteria without running transformers' "
    "generate twice more per image)"
)
TOP1_NOTE = (
    "top1 counts only positions where the reference's top-2 logit margin exceeds the profile's top1_margin "
    "(the variant's measured numerical noise); `counted` says how many did, `swing` is the largest top-2 "
    "logit swing seen (reported, not judged)"
)
CAPTION_NOTE = (
    "greedy captions identical token for token: {exact:.0%} of {count}; the verdict's match counts a caption equal "
    "up to the reference's first near-tie (top-2 margin ≤ top1_margin), where either token is the reference's choice "
    "by less than the variant's noise"
)
PORTABLE_NOTE = (
    "portability: every integer kernel's worst int16 pair sum over the stored weights and any uint8 activation, "
    "against 32767 (x86 without VNNI saturates there; validate/portable.py) — proven from the files, whatever CPU ran this check"
)
# Shape facts a checkpoint must share with the bundle for a comparison to mean anything.
SHAPE_FACTS = ("num_layers", "kv_heads", "head_dim", "embed_dim", "vocab_size", "image_size")


@dataclass
class _Reference:
    """Where reference numbers come from: component runner, caption runner, caption tokens."""

    name: str
    components: Runner  # what the bundle was exported from (the merged model, or fp32 ONNX)
    captions: Runner  # the true reference for end-to-end numbers (the LoRA model, or fp32 ONNX)
    tokens: Callable[[np.ndarray, np.ndarray], list[list[int]]]  # (pixels, prefix) → greedy tokens
    # A LoRA checkpoint: `components` is its merged model, also compared with `captions` (the LoRA model).
    merge_check: bool = False


def check_bundle(
    onnx_dir: Path,
    model_dir: Path | None,
    variant: str = "fp32",
    profile: Profile | None = None,
    images: Path | None = None,
    max_new_tokens: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check `variant` of the bundle at `onnx_dir` against its reference under `profile`
    (default: the profile named like the variant) and record the verdict in the manifest.

    A failing comparison does not raise: the report says what failed (`passed`,
    `parity_error()`), so callers such as `quantize` can act on it.

    Raises:
        UsageError: bad arguments, an unusable profile, or a checkpoint of another shape.
        BundleError: a file missing, changed, truncated, or whose signature differs from the manifest.
        ImageError: an image in `images` cannot be read.
        CheckpointError: the checkpoint cannot be loaded.
    """
    started = time.perf_counter()
    step = on_step or (lambda message: None)
    onnx_dir = Path(onnx_dir)
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}", f"use one of: {', '.join(VARIANTS)}")
    if model_dir is None and variant == "fp32":
        raise UsageError("checking fp32 needs --model-dir (fp32 is itself the reference of every other variant)", "pass --model-dir CKPT")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} is not positive", "pass a number of tokens ≥ 1")
    profile = profile or profile_named(variant)
    step("verifying files and signatures")
    manifest = verify_bundle(onnx_dir, variant)
    step("proving the integer kernels cannot saturate on any CPU")
    proofs = portability(onnx_dir, manifest, variant)
    preprocessor = bundle_preprocessor(onnx_dir)
    names, pixels = _load_images(images, preprocessor)
    step("opening the bundle")
    candidate = open_bundle(onnx_dir, variant)
    tokenizer = load_tokenizer(onnx_dir)
    max_new = max_new_tokens or int(manifest.model["max_length"])
    eos, pad = manifest.model["eos_token_id"], manifest.model["pad_token_id"]
    pad = eos if pad is None else pad
    step("loading the reference")
    reference = _reference(onnx_dir, model_dir, manifest, max_new)

    step("reference captions")
    ref_hidden = np.concatenate([reference.components.vision(pixels[chunk]) for chunk in _chunks(len(names))])
    ref_prefix = reference.components.project(ref_hidden)
    ref_tokens = [t for chunk in _chunks(len(names)) for t in reference.tokens(pixels[chunk], ref_prefix[chunk])]
    # The reference's decoder runs once, at the largest batch; smaller batches compare against
    # its first rows (rows are independent). Fewer images than the batch: they repeat.
    rows = np.arange(max(BATCHES)) % len(names)
    steps = _step_tokens([ref_tokens[i] for i in rows], pad)
    ref_passes = decode_passes(reference.components, ref_prefix[rows], steps)
    measurements: list[Measurement] = []
    for batch in BATCHES:
        step(f"components at batch {batch}")
        first = rows[:batch]
        passes = [(logits[:batch], [t[:batch] for t in past]) for logits, past in ref_passes]
        measurements += _component_measurements(
            candidate, pixels[first], ref_hidden[first], ref_prefix[first], steps[:batch], passes, manifest.layout, profile, batch
        )
    step("captions end to end")
    captions, e2e, exact, kl = _end_to_end(reference, candidate, pixels, ref_prefix, ref_tokens, max_new, eos, pad, profile)
    measurements += e2e + [p.measurement for p in proofs]
    notes = [f"end-to-end captions: {max_new} new tokens at most, greedy", TOP1_NOTE]
    if model_dir is not None:
        notes.append(MERGE_NOTE if reference.merge_check else "merged vs LoRA: not measured, the checkpoint has no LoRA adapters")
    notes += _target_note(kl, profile, len(names))
    texts = zip(decode(tokenizer, ref_tokens), decode(tokenizer, captions))
    report = CheckReport(
        bundle=onnx_dir,
        layout=manifest.layout,
        variant=variant,
        profile=profile,
        reference=reference.name,
        images=names,
        measurements=measurements,
        captions=[CaptionResult(name, ref, got, rt, ct) for name, ref, got, (rt, ct) in zip(names, ref_tokens, captions, texts)],
        notes=notes + [CAPTION_NOTE.format(exact=exact, count=len(names))] + [PORTABLE_NOTE],
        portability=[p.to_json() for p in proofs],
        host=host_cpu(),
        exact_captions=exact,
    )
    step("recording the verdict in the manifest")
    report.notes += _record_verdict(onnx_dir, report)
    report.seconds = time.perf_counter() - started
    return report


def verify_bundle(onnx_dir: Path, variant: str = "fp32") -> Manifest:
    """Integrity before any number: the manifest is readable and has `variant`, every file it
    lists exists with its size and sha256, and every graph's inputs and outputs are the ones
    the manifest records.

    Raises:
        BundleError: naming the first file that is missing, changed or of another signature.
    """
    manifest = read_manifest(onnx_dir)
    manifest.component_file("vision_encoder", variant)  # raises for a variant the bundle lacks
    verify_files(onnx_dir, manifest)
    for relative, info in manifest.files.items():
        if "inputs" in info:
            _verify_signature(onnx_dir, relative, info)
    return manifest


def _verify_signature(onnx_dir: Path, relative: str, info: dict[str, Any]) -> None:
    try:
        actual = signature(onnx_dir / relative)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base class
        raise BundleError(f"{relative} is not a readable ONNX graph ({type(exc).__name__})", "re-export the bundle") from exc
    for kind in ("inputs", "outputs"):
        if actual[kind] != info[kind]:
            pairs = zip(actual[kind], info[kind])
            differ = next((f"{a['name']} {a['dtype']} {a['shape']}, manifest {b['name']} {b['dtype']} {b['shape']}" for a, b in pairs if a != b), "another count")
            raise BundleError(f"{relative}: its {kind} differ from the manifest ({differ})", "re-export the bundle; check trusts only graphs its manifest describes")


def _load_images(folder: Path | None, preprocessor: Preprocessor) -> tuple[list[str], np.ndarray]:
    """(names, pixel values): the bundled samples, or every image file in `folder` (sorted)."""
    if folder is None:
        pictures = sample_images(DEFAULT_IMAGES, preprocessor.height)
        return [f"sample {i}" for i in range(len(pictures))], preprocessor(pictures)
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"--images {folder} is not a folder", "pass a folder of image files")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", "pass a folder with at least one image")
    return [p.name for p in paths], preprocessor([open_image(p) for p in paths])


def _reference(onnx_dir: Path, model_dir: Path | None, manifest: Manifest, max_new: int) -> _Reference:
    if model_dir is None:
        fp32 = open_bundle(onnx_dir, "fp32")
        eos, pad = manifest.model["eos_token_id"], manifest.model["pad_token_id"]
        return _Reference("onnx fp32", fp32, fp32, lambda pixels, prefix: greedy(fp32, prefix, max_new, eos, pad))
    checkpoint = load_checkpoint(model_dir)
    _same_shape(manifest, checkpoint)
    merged = merged_model(checkpoint.model) if checkpoint.model.has_lora else checkpoint.model
    options = DecodeOptions(max_new_tokens=max_new)
    return _Reference(
        "pytorch",
        TorchRunner(merged),
        TorchRunner(checkpoint.model),
        # transformers' generate on the LoRA model, as users caption with it (it re-runs the
        # vision encoder: generate takes pixels, and check must not re-implement it).
        lambda pixels, prefix: _single_threaded(generate_tokens, checkpoint.model, checkpoint.tokenizer, pixels, options),
        merge_check=checkpoint.model.has_lora,
    )


def _single_threaded(function: Callable[..., T], *args: Any) -> T:
    """Run `function` with one PyTorch intra-op thread. generate's thousands of small ops gain
    nothing from a pool and lose badly when cores are shared: on a busy 2-core machine, four
    30-token SmolLM-135M captions took 179 s of CPU with 2 threads and 7.8 s with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(previous)


def _same_shape(manifest: Manifest, checkpoint: Checkpoint) -> None:
    shape = decoder_shape(checkpoint.model.causal_lm)
    facts = {**vars(shape), "image_size": checkpoint.preprocessor.height}
    differ = [f"{k} {manifest.model.get(k)} vs {facts[k]}" for k in SHAPE_FACTS if manifest.model.get(k) != facts[k]]
    if differ:
        raise UsageError(
            f"the bundle was exported from a model of another shape than {checkpoint.path} (bundle vs checkpoint: {', '.join(differ)})",
            "pass the --model-dir the bundle was exported from",
        )


def _chunks(count: int) -> list[slice]:
    return [slice(start, start + CAPTION_BATCH) for start in range(0, count, CAPTION_BATCH)]


def _step_tokens(captions: list[list[int]], pad: int) -> np.ndarray:
    """The first DECODE_STEPS reference tokens per row (pad after a short caption, as generate
    feeds finished rows): the cached steps are measured on the reference's own path."""
    return np.array([(c + [pad] * DECODE_STEPS)[:DECODE_STEPS] for c in captions], np.int64)


def _rows(component: str, output: str, values: dict[str, Any], bounds: TensorBounds, batch: int | None) -> list[Measurement]:
    out = []
    for key, value in values.items():
        if key == "top1":  # an Agreement: the rate, and how many positions counted
            assert bounds.top1 is not None  # profiles.py requires top1 wherever it is measured (logits)
            out.append(Measurement(component, output, key, value.rate, bounds.top1, True, batch, value.counted, value.positions, value.swing))
        else:
            out.append(Measurement(component, output, key, value, getattr(bounds, key), key in HIGHER_IS_BETTER, batch))
    return out


def _tensor_values(reference: np.ndarray, candidate: np.ndarray, bounds: TensorBounds) -> dict[str, Any]:
    values: dict[str, Any] = {"rel_max": rel_max(reference, candidate), "rel_mean": rel_mean(reference, candidate), "cosine": cosine(reference, candidate)}
    if bounds.top1 is not None and bounds.top1_margin is not None:
        values["top1"] = clear_top1(reference, candidate, bounds.top1_margin)
    return values


def _logits_values(reference: np.ndarray, candidate: np.ndarray, bounds: TensorBounds) -> dict[str, Any]:
    """`_tensor_values` of logits, each row centered (metrics.centered: softmax ignores a row's shift)."""
    if reference.shape != candidate.shape:
        return _tensor_values(reference, candidate, bounds)  # the metrics' own shape verdicts
    return _tensor_values(centered(reference), centered(candidate), bounds)


def _present_values(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """The worst present tensor (validate.metrics.present_values); none at all is infinitely wrong."""
    if not reference:
        return {"rel_max": float("inf"), "rel_mean": float("inf"), "cosine": float("-inf")}
    return present_values(reference, candidate)


def _component_measurements(
    candidate: Runner,
    pixels: np.ndarray,
    hidden: np.ndarray,
    prefix: np.ndarray,
    tokens: np.ndarray,
    ref_passes: list[tuple[np.ndarray, list[np.ndarray]]],
    layout: str,
    profile: Profile,
    batch: int,
) -> list[Measurement]:
    """Each candidate graph fed the reference's inputs (pixels, hidden states, prefix, tokens), so
    an error is attributed to the graph that made it; cached steps run on the candidate's own past."""
    if projection_in_vision(layout):  # its vision encoder returns the prefix
        out = _rows("vision_encoder", "image_features", _tensor_values(prefix, candidate.vision(pixels), profile.vision_encoder), profile.vision_encoder, batch)
    else:
        out = _rows("vision_encoder", "last_hidden_state", _tensor_values(hidden, candidate.vision(pixels), profile.vision_encoder), profile.vision_encoder, batch)
        out += _rows("projection", "projected_prefix", _tensor_values(prefix, candidate.project(hidden), profile.projection), profile.projection, batch)
    first, later = decoder_graphs(layout)
    first = f"{first} first pass" if first == later else first
    passes = zip(ref_passes, decode_passes(candidate, prefix, tokens))
    for i, ((ref_logits, ref_past), (got_logits, got_past)) in enumerate(passes):
        name = first if i == 0 else f"{later} step {i}"
        out += _rows(name, "logits", _logits_values(ref_logits, got_logits, profile.logits), profile.logits, batch)
        out += _rows(name, "present.*", _present_values(ref_past, got_past), profile.present, batch)
    return out


def _forced_ids(tokens: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference tokens padded into [batch, width] ids, and the mask of logits positions that
    predict one of them or the end of sequence after it (position j predicts token j)."""
    width = max(len(t) for t in tokens)
    ids = np.array([t + [pad] * (width - len(t)) for t in tokens], np.int64).reshape(len(tokens), width)
    return ids, forced_positions(tokens, width)


def _stepwise_logits(runner: Runner, prefix: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[batch, 1 + T, vocab] logits with `ids` fed one cached step at a time: the graphs and the
    path generation takes (in the distilvit layout, language_model rather than prefix_init)."""
    logits, past = runner.first_pass(prefix)
    collected = [logits[:, -1]]
    for token in ids.T:
        logits, past = runner.step(token[:, None], past)
        collected.append(logits[:, -1])
    return np.stack(collected, axis=1)


def _end_to_end(
    reference: _Reference,
    candidate: Runner,
    pixels: np.ndarray,
    ref_prefix: np.ndarray,
    ref_tokens: list[list[int]],
    max_new: int,
    eos: int | None,
    pad: int,
    profile: Profile,
) -> tuple[list[list[int]], list[Measurement], float, np.ndarray]:
    """(captions, measurements, exact caption match rate, KL at each forced position): the whole bundle (its own vision and
    projection) against the true reference: free-running
    greedy captions, and teacher-forced decoding along the reference tokens, so that one early
    flip neither hides nor exaggerates the rest. The bundle is fed those tokens step by step
    through its cache, as it generates; the reference (whose generation path transformers owns)
    in one pass. With a LoRA checkpoint, the merged model is teacher-forced too (MERGE_NOTE)."""
    captions: list[list[int]] = []
    forced_ref, forced_got, merged = [], [], []  # logits at the forced positions, row after row
    for chunk in _chunks(len(ref_tokens)):
        prefix = candidate.prefix(pixels[chunk])
        captions += greedy(candidate, prefix, max_new, eos, pad)
        ids, valid = _forced_ids(ref_tokens[chunk], pad)
        forced_ref.append(reference.captions.first_pass(ref_prefix[chunk], ids)[0][valid])
        forced_got.append(_stepwise_logits(candidate, prefix, ids)[valid])
        if reference.merge_check:
            merged.append(reference.components.first_pass(ref_prefix[chunk], ids)[0][valid])
    ref_logits, got_logits = np.concatenate(forced_ref), np.concatenate(forced_got)
    bounds = profile.end_to_end
    exact = float(np.mean([got == ref for got, ref in zip(captions, ref_tokens)]))
    match = _clear_caption_match(ref_logits, ref_tokens, captions, profile.logits.top1_margin or 0.0)
    # Clear-margin top-1 with the variant's noise: its logits' top1_margin (see validate.metrics).
    agree = clear_top1(ref_logits, got_logits, profile.logits.top1_margin or 0.0)
    kl = kl_divergence(ref_logits, got_logits)
    out = [
        Measurement("end_to_end", "greedy captions", "match", match, bounds.caption_match, True),
        Measurement(
            "end_to_end", "teacher-forced", "top1", agree.rate, bounds.teacher_forced_top1, True, None, agree.counted, agree.positions, agree.swing
        ),
        Measurement("end_to_end", "teacher-forced", "kl", float(kl.mean()), bounds.teacher_forced_kl),
    ]
    if reference.merge_check:
        out += merge_measurements(ref_logits, np.concatenate(merged), merge_bounds(profile))
    return captions, out, exact, kl


def _target_note(kl: np.ndarray, profile: Profile, images: int) -> list[str]:
    """Whether the mean KL (`kl`: one value per forced position) meets the profile's fidelity goal
    (`target_kl`): said, not judged (see validate.profiles.EndToEndBounds), with how much of it
    a few knife-edge positions carry."""
    goal = profile.end_to_end.target_kl
    if goal is None or not kl.size:
        return []
    mean = float(kl.mean())
    edges, off_edges = knife_edges(kl)
    verdict = "meets" if mean <= goal else "misses"
    return [
        f"fidelity goal: the teacher-forced mean KL {mean:.3g} {verdict} the profile's target_kl {goal:g}; "
        f"{edges} of {kl.size} positions over {KNIFE_EDGE:g} nat, the others' mean {off_edges:.3g} (reported, not judged: "
        f"a mean over {images} images is carried by a few positions and images and moves with the CPU's float kernels; "
        "bench/fidelity_bench.py measures it on 96 images and text)"
    ]


def _clear_caption_match(ref_logits: np.ndarray, ref_tokens: list[list[int]], captions: list[list[int]], margin: float) -> float:
    """Fraction of captions identical to the reference's up to its first near-tie: the first
    position whose top-2 margin is ≤ `margin` (the variant's noise), where either token is the
    reference's choice by less than that noise and what follows is another caption, not an
    error. With no near-tie the whole caption, end included, must be equal. `ref_logits` holds
    the reference's logits at the forced positions, row after row: len(tokens) + 1 per row."""
    equal, start = [], 0
    for reference, caption in zip(ref_tokens, captions):
        margins = top2_margin(ref_logits[start : start + len(reference) + 1])
        start += len(reference) + 1
        ties = np.flatnonzero(margins <= margin)
        equal.append(caption == reference if not ties.size else caption[: ties[0]] == reference[: ties[0]])
    return float(np.mean(equal))


def _record_verdict(onnx_dir: Path, report: CheckReport) -> list[str]:
    """Keep the verdict in the manifest's `checks`; a read-only bundle is checked all the same."""
    try:
        manifest = read_manifest(onnx_dir)
        manifest.checks[report.variant] = report.manifest_entry()
        manifest.write(onnx_dir)
    except OSError as exc:
        return [f"verdict not recorded in the manifest ({exc.strerror})"]
    return []
