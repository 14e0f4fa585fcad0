"""The verification run at the end of every export (`verify_bundle`): onnx.checker on every
graph, every graph loaded in ONNX Runtime, and a quick parity pass — one image, every component,
two cached steps — errors relative to each tensor's RMS (`rel_max`, `rel_mean`), bounded by the
fp32 tolerance profile (configs/tolerances/fp32.toml), the same bounds `check` holds fp32 to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from vlmexport.bundle.manifest import decoder_graphs, projection_in_vision, read_manifest
from vlmexport.errors import BundleError, ParityError
from vlmexport.exporter.memory import release_freed_memory
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.runner import Runner
from vlmexport.validate.metrics import Measurement, present_values, rel_max, rel_mean
from vlmexport.validate.profiles import Profile, TensorBounds, profile_named

Pass = tuple[np.ndarray, list[np.ndarray]]  # (logits, present)


def decode_passes(runner: Runner, prefix: np.ndarray, tokens: np.ndarray) -> list[Pass]:
    """(logits, present) of the first pass, then of one cached step per column of `tokens`."""
    return continue_passes(runner, runner.first_pass(prefix), tokens)


def continue_passes(runner: Runner, first: Pass, tokens: np.ndarray) -> list[Pass]:
    """`first`, then one cached step of `runner` per column of `tokens` after it."""
    logits, past = first
    passes = [(logits, past)]
    for column in range(tokens.shape[1]):
        logits, past = runner.step(tokens[:, column : column + 1], past)
        passes.append((logits, past))
    return passes


def greedy_tokens(runner: Runner, prefix: np.ndarray, steps: int) -> np.ndarray:
    """The runner's own greedy choices for `steps` cached steps, [batch, steps]."""
    logits, past = runner.first_pass(prefix)
    chosen = []
    for _ in range(steps):
        chosen.append(logits[:, -1].argmax(-1))
        logits, past = runner.step(chosen[-1][:, None].astype(np.int64), past)
    return np.stack(chosen, 1).astype(np.int64) if chosen else np.zeros((prefix.shape[0], 0), np.int64)


@dataclass(frozen=True)
class SmokeReference:
    """The reference's side of the smoke parity, recorded so the reference model can be
    released before the bundle is opened (export holds one model's weights at a time)."""

    pixel_values: np.ndarray
    hidden: np.ndarray
    prefix: np.ndarray
    tokens: np.ndarray  # the reference's greedy choices, fed to both sides
    passes: list[tuple[np.ndarray, list[np.ndarray]]]


def record_reference(reference: Runner, pixel_values: np.ndarray, steps: int = 2) -> SmokeReference:
    """Vision, projection, first pass and `steps` cached steps of `reference` on one batch."""
    hidden = reference.vision(pixel_values)
    prefix = reference.project(hidden)
    tokens = greedy_tokens(reference, prefix, steps)
    return SmokeReference(pixel_values, hidden, prefix, tokens, decode_passes(reference, prefix, tokens))


def _relative(component: str, output: str, reference: np.ndarray, candidate: np.ndarray, bounds: TensorBounds) -> list[Measurement]:
    return [
        Measurement(component, output, "rel_max", rel_max(reference, candidate), bounds.rel_max),
        Measurement(component, output, "rel_mean", rel_mean(reference, candidate), bounds.rel_mean),
    ]


def _present(name: str, reference: list[np.ndarray], candidate: list[np.ndarray], bounds: TensorBounds) -> list[Measurement]:
    """Each present tensor relative to its own RMS; the worst tensor is the measurement."""
    values = present_values(reference, candidate)
    return [
        Measurement(name, "present.*", "rel_max", values["rel_max"], bounds.rel_max),
        Measurement(name, "present.*", "rel_mean", values["rel_mean"], bounds.rel_mean),
    ]


def prefix_parity(recorded: SmokeReference, candidate: Runner, profile: Profile | None = None, layout: str = "distilvit") -> list[Measurement]:
    """The vision encoder and the projection (the candidate needs only those two), under
    `profile` (default fp32). Where the layout's vision encoder includes the projection, its
    output is the prefix, held to the vision encoder's bounds."""
    profile = profile or profile_named("fp32")
    hidden = candidate.vision(recorded.pixel_values)
    if projection_in_vision(layout):
        return _relative("vision_encoder", "image_features", recorded.prefix, hidden, profile.vision_encoder)
    out = _relative("vision_encoder", "last_hidden_state", recorded.hidden, hidden, profile.vision_encoder)
    return out + _relative("projection", "projected_prefix", recorded.prefix, candidate.project(recorded.hidden), profile.projection)


def decoder_parity(recorded: SmokeReference, layout: str, first: Pass, stepper: Runner, profile: Profile | None = None) -> list[Measurement]:
    """The candidate's first pass (`first`, run on `recorded.prefix`) and its cached steps
    (`stepper` needs only the graph that runs them), under `profile` (default fp32)."""
    profile = profile or profile_named("fp32")
    out = []
    first_name, later = decoder_graphs(layout)
    first_name = f"{first_name} first pass" if first_name == later else first_name
    passes = zip(recorded.passes, continue_passes(stepper, first, recorded.tokens))
    for i, ((ref_logits, ref_past), (got_logits, got_past)) in enumerate(passes):
        name = first_name if i == 0 else f"{later} step {i}"
        out += _relative(name, "logits", ref_logits, got_logits, profile.logits)
        out += _present(name, ref_past, got_past, profile.present)
    return out


def check_graphs(bundle_dir: Path, files: list[str]) -> None:
    """onnx.checker (full check) on each graph file.

    Raises:
        BundleError: naming the first graph that fails.
    """
    for relative in files:
        try:
            onnx.checker.check_model(str(bundle_dir / relative), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise BundleError(f"{relative} fails onnx.checker ({str(exc).splitlines()[0]})", "report this as a vlmexport bug") from exc


def verify_bundle(bundle_dir: Path, recorded: SmokeReference, profile: Profile | None = None) -> list[Measurement]:
    """The export's verification of the fp32 graphs in `bundle_dir` (its manifest written):
    onnx.checker, ONNX Runtime loads each graph, and the smoke parity against `recorded` under
    `profile` (default fp32). Returns the measurements, all within bounds.

    Raises:
        BundleError: a graph fails the checker or cannot be loaded.
        ParityError: a measurement is out of bounds (the first one, with its value and bound).
    """
    manifest = read_manifest(bundle_dir)
    check_graphs(bundle_dir, list(manifest.variants["fp32"].values()))
    release_freed_memory()  # the checker's copies of the graphs
    # One graph's sessions at a time (vision and projection together): every graph of
    # the distilvit layout open at once was the export's peak (1.8 GB of sessions).
    smoke = prefix_parity(recorded, open_bundle(bundle_dir, components=("vision_encoder", "projection")), profile, manifest.layout)
    first_graph, step_graph = decoder_graphs(manifest.layout)
    decoder = open_bundle(bundle_dir, components=(first_graph, "embed_tokens"))  # embed_tokens: only where a layout has it
    first = decoder.first_pass(recorded.prefix)
    if step_graph != first_graph:
        del decoder
        release_freed_memory()
        decoder = open_bundle(bundle_dir, components=(step_graph, "embed_tokens"))
    smoke += decoder_parity(recorded, manifest.layout, first, decoder, profile)
    failed = [m for m in smoke if not m.passed]
    if failed:
        worst = failed[0]
        raise ParityError(f"{worst.component} {worst.output}", worst.metric, worst.value, worst.tolerance, "report this as a vlmexport bug")
    return smoke
