"""The quick parity pass run at the end of every export: one image, every component, two cached steps."""

from __future__ import annotations

import numpy as np

from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.runtime.bundle import Bundle
from vlmexport.validate.metrics import Measurement, max_abs
from vlmexport.validate.reference import torch_components, torch_decode_trace

ACTIVATION_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-3


def decode_measurements(
    bundle: Bundle, model: PrefixConditioningVLM, prefix: np.ndarray, steps: np.ndarray | int,
    logits_tolerance: float, activation_tolerance: float,
) -> list[Measurement]:
    """Max abs error of logits and cache, first pass then each cached step, both fed the same tokens
    (the given ones, or PyTorch's greedy choices)."""
    reference = torch_decode_trace(model, prefix, steps)
    logits, past = bundle.first_pass(prefix)
    got_logits, got_present = [logits], [past]
    for column in range(reference.tokens.shape[1]):
        logits, past = bundle.step(reference.tokens[:, column : column + 1], past)
        got_logits.append(logits)
        got_present.append(past)
    first, later = ("prefix_init", "language_model") if bundle.manifest.layout == "distilvit" else ("decoder", "decoder")
    out = []
    for i, (ref_l, got_l, ref_p, got_p) in enumerate(zip(reference.logits, got_logits, reference.present, got_present)):
        name = first if i == 0 else f"{later} step {i}"
        out.append(Measurement(name, "logits", "max_abs", max_abs(ref_l, got_l), logits_tolerance))
        present_err = max(map(max_abs, ref_p, got_p), default=0.0) if len(ref_p) == len(got_p) else float("inf")
        out.append(Measurement(name, "present.*", "max_abs", present_err, activation_tolerance))
    return out


def smoke_parity(bundle: Bundle, model: PrefixConditioningVLM, pixel_values: np.ndarray, steps: int = 2) -> list[Measurement]:
    """fp32 bundle vs the (merged) PyTorch model: activations ≤ 1e-4, logits ≤ 1e-3 max abs."""
    hidden, prefix = torch_components(model, pixel_values)
    return [
        Measurement("vision_encoder", "last_hidden_state", "max_abs", max_abs(hidden, bundle.vision(pixel_values)), ACTIVATION_TOLERANCE),
        Measurement("projection", "projected_prefix", "max_abs", max_abs(prefix, bundle.project(hidden)), ACTIVATION_TOLERANCE),
        *decode_measurements(bundle, model, prefix, steps, LOGITS_TOLERANCE, ACTIVATION_TOLERANCE),
    ]
