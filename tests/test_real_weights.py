"""The verdicts on real weights: the fp32 export of the real-weights checkpoint (pretrained
SmolLM2-135M-Instruct decoder, tests/conftest.py `real_checkpoint`) passes its merge
verification, its smoke parity and `check`; the faults test_check injects into toy bundles —
one weight ×1.01, another checkpoint's projection, positions off by one — fail `check` here too.

Absolute bounds failed this model's correct export (a pretrained decoder's logits and KV values
are 10-100× a random toy's, and so is float32's rounding on them): these tests keep the
relative criteria honest on both ends. Cheap by design: one export per session, shared bundle
files (hard links; a fault rewrites only the file it breaks), short captions for the faults.
The captioner preset's captions: test_train_projection.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_check import rehash, scale_one_weight

from vlmexport.bundle.manifest import MANIFEST_NAME
from vlmexport.exporter.export import ExportResult, export_bundle
from vlmexport.runtime.bundle import Bundle
from vlmexport.validate import check
from vlmexport.validate.check import check_bundle

FAULT_TOKENS = 8  # the faults show within a few tokens (where no PyTorch reference is shared)


@pytest.fixture(scope="module")
def real_export(real_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportResult]:
    """(bundle, export result): the compact fp32 export, merge-verified and smoke-checked by export itself."""
    out = tmp_path_factory.mktemp("real") / "onnx"
    return out, export_bundle(real_checkpoint, out, layout="compact")


def linked_copy(source: Path, target: Path) -> Path:
    """The bundle with every file hard-linked (900 MB not copied); the manifest, which check
    rewrites, is a real copy. A fault must unlink a file before rewriting it."""
    shutil.copytree(source, target, copy_function=os.link)
    (target / MANIFEST_NAME).unlink()
    shutil.copy(source / MANIFEST_NAME, target / MANIFEST_NAME)
    return target


def foreign_projection(bundle_dir: Path, seed: int = 1) -> None:
    """Another checkpoint's projection: the same weight values in an unrelated arrangement (the
    statistics a projection trained from another seed would have, not its mapping), re-hashed."""
    path = bundle_dir / "projection.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(rng.permutation(values.ravel()).reshape(values.shape), init.name))
    path.unlink()
    onnx.save(model, str(path))
    rehash(bundle_dir, "projection.onnx")


def test_real_weights_export_passes_its_merge_verification_and_smoke_parity(real_export) -> None:
    _, result = real_export
    assert result.merge is not None and result.merge.measurements and not result.merge.failures
    top1 = next(m for m in result.merge.measurements if m.metric == "top1")
    assert top1.counted, "no position clear of the merge's noise: the top-1 criterion proved nothing"
    assert result.smoke and all(m.passed for m in result.smoke)


def test_real_weights_check_passes(real_export, real_checkpoint: Path, shared_reference) -> None:
    bundle_dir, _ = real_export
    report = check_bundle(bundle_dir, real_checkpoint)
    assert report.passed, [f"{m.component} {m.output} {m.metric} {m.value:.3g} vs {m.tolerance:.3g}" for m in report.failures]
    forced = next(m for m in report.measurements if m.component == "end_to_end" and m.metric == "top1")
    assert forced.counted and forced.counted >= forced.positions // 2, "too few clear positions for top-1 to mean anything"


def shift_positions(monkeypatch: pytest.MonkeyPatch, variant: str | None = None) -> None:
    """The fault "positions off by one": every cached step is fed the position after its own (in
    every bundle, or in `variant`'s alone)."""
    real_step = Bundle.step

    def step(self: Bundle, ids: np.ndarray, past: list[np.ndarray], position_offset: int | None = None) -> tuple:
        return real_step(self, ids, past, past[0].shape[2] + 1 if variant in (None, self.variant) else position_offset)

    monkeypatch.setattr(Bundle, "step", step)


def _key(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.shape, value.dtype.str, hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    return value


def _memoized(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, computed once per distinct argument values (arrays by content); each caller
    gets its own copy, so no check can change what the next one is given."""
    results: dict[Any, Any] = {}

    def call(*args: Any, **kwargs: Any) -> Any:
        key = _key((*args, *sorted(kwargs.items())))
        if key not in results:
            results[key] = function(*args, **kwargs)
        return copy.deepcopy(results[key])

    return call


class _Memo:
    """A reference runner whose every call is computed once (see shared_reference)."""

    def __init__(self, runner: Any) -> None:
        for name in ("prefix", "vision", "project", "first_pass", "step"):
            setattr(self, name, _memoized(getattr(runner, name)))


@pytest.fixture(scope="module")
def reference_cache() -> dict:
    return {}


@pytest.fixture
def shared_reference(reference_cache: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passing check and the faults' checks share one PyTorch reference: a fault changes the
    bundle, never the reference's inputs (the same images, the reference's own tokens), so its
    numbers are computed for the first check and looked up for the others — the same numbers,
    not PyTorch's 20-odd seconds again (the checkpoint load, generate, the teacher-forced
    passes). Only references from a checkpoint are shared; a bundle's fp32 reference is computed
    as usual."""
    real = check._reference

    def reference(onnx_dir: Path, model_dir: Path | None, manifest: Any, max_new: int) -> Any:
        if model_dir is None:
            return real(onnx_dir, model_dir, manifest, max_new)
        key = (Path(model_dir).resolve(), max_new)
        if key not in reference_cache:
            built = real(onnx_dir, model_dir, manifest, max_new)
            reference_cache[key] = dataclasses.replace(
                built, components=_Memo(built.components), captions=_Memo(built.captions), tokens=_memoized(built.tokens)
            )
        return reference_cache[key]

    monkeypatch.setattr(check, "_reference", reference)


@pytest.mark.parametrize("fault", ["one weight ×1.01", "another checkpoint's projection", "positions off by one"])
def test_real_weights_check_fails_the_injected_faults(real_export, real_checkpoint: Path, tmp_path: Path, monkeypatch, shared_reference, fault: str) -> None:
    source, _ = real_export
    bundle_dir = linked_copy(source, tmp_path / "onnx")
    if fault == "one weight ×1.01":
        scale_one_weight(bundle_dir, "decoder/model.onnx")
        culprits = {"decoder first pass", "decoder step 1"}
    elif fault == "another checkpoint's projection":
        foreign_projection(bundle_dir)
        culprits = {"projection"}
    else:
        shift_positions(monkeypatch)
        culprits = {"decoder step 1"}
    report = check_bundle(bundle_dir, real_checkpoint)  # full captions: the passing check's reference, looked up
    failing = {m.component for m in report.failures}
    assert not report.passed and failing & culprits, failing
    # Each graph is fed the reference's inputs, so the vision encoder upstream still passes.
    assert "vision_encoder" not in failing


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_real_weights_variants_pass_their_profiles(real_export, tmp_path: Path, monkeypatch, mode: str) -> None:
    """The shipped recipes keep the pretrained decoder's behaviour within their profiles (int8:
    mean KL ≤ 0.03 — a parity bound with headroom over both CPU kinds, the 0.01 goal reported
    beside it; fp16 KL ≤ 0.001), and int8's looser bound still fails positions off by one."""
    from vlmexport.quantize.quantize import quantize_bundle

    source, _ = real_export
    bundle_dir = linked_copy(source, tmp_path / "onnx")
    report = quantize_bundle(bundle_dir, mode)
    assert report.passed, report.check.summary()
    kl = next(m for m in report.check.measurements if m.component == "end_to_end" and m.metric == "kl")
    assert kl.value <= {"int8": 0.03, "fp16": 0.001}[mode]
    assert all(p["passed"] for p in report.check.portability)
    assert report.ratio <= {"int8": 0.30, "fp16": 0.55}[mode]
    goal = [note for note in report.check.notes if note.startswith("fidelity goal")]
    assert len(goal) == (mode == "int8") and (not goal or f"{kl.value:.3g}" in goal[0]), report.check.notes
    if mode == "int8":  # the fault in int8 alone, against fp32's bundle (no PyTorch to load): KL 0.21 (AMD EPYC, AVX2), bound 0.03
        shift_positions(monkeypatch, variant=mode)
        faulty = check_bundle(bundle_dir, None, variant=mode, max_new_tokens=FAULT_TOKENS)
        assert not faulty.passed and any(m.component == "end_to_end" and m.metric == "kl" for m in faulty.failures), faulty.summary()
