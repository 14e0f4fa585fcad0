"""Error metrics between a reference tensor and an exported one — all of them scale-free, so a
bound means the same on a toy model and on a pretrained one.

- `rel_max`, `rel_mean`: the largest and the mean absolute difference divided by the root mean
  square of the whole reference tensor (an all-zero reference divides by 1: absolute). A
  pretrained decoder's logits and KV values are 10-100× those of a random toy model, and so is
  float32's rounding on them; an absolute 1e-4 that holds on random weights fails a correct
  export of real weights (measured: present.* max_abs 8.6e-4 with logits agreeing to 4e-5).
- `cosine`: of the flattened tensors.
- Logits are compared `centered` (each row minus its mean): softmax ignores a constant added to
  a row, and a quantized decoder shifts whole rows. Measured on the captioner preset's int8 (AMD
  EPYC, AVX2): one cached step's row moved by 0.7 nats as a whole — KL 0.014, centered cosine
  0.9987, raw cosine 0.9875, which failed the profile's 0.998 on a shift no caption can see.
- clear-margin top-1 (`clear_top1`): arg-max agreement counted only at positions where the
  reference's top-2 margin (top-1 logit minus top-2 logit = the difference of their
  log-probabilities, in nats) exceeds `margin`. `margin` is the variant's numerical noise: the
  largest top-2 logit swing (`logit_swing`) that variant's arithmetic is measured to cause on
  the real-weights model — a number in the tolerance profile with its measurement, never
  computed from the candidate being checked (a noise derived from the candidate would excuse a
  broken candidate: the more wrong it is, the fewer positions would count). Where the margin
  exceeds the noise a correct candidate cannot flip the arg-max; a flip there is a fault.
  Near-ties (margin ≤ noise) are left to KL, which weighs them by how little they matter.
- `kl_divergence`: KL(softmax(reference) ‖ softmax(candidate)) per position, in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measurement:
    """One number about one output, with the bound it must respect."""

    component: str
    output: str
    metric: str
    value: float
    tolerance: float
    higher_is_better: bool = False
    # The batch size it was measured at, where the same output is measured at several.
    batch: int | None = None
    # Clear-margin top-1 only: positions whose reference margin exceeded the threshold (the
    # ones counted), and all positions compared.
    counted: int | None = None
    positions: int | None = None
    # ... and the largest top-2 logit swing seen (`logit_swing`): what a profile's top1_margin
    # is re-measured from; reported, never part of the verdict.
    swing: float | None = None

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.tolerance if self.higher_is_better else self.value <= self.tolerance


@dataclass(frozen=True)
class Agreement:
    """Clear-margin top-1: the agreement rate over the `counted` positions of `positions`
    (1.0 when none counted: there was nothing the candidate could be wrong about)."""

    rate: float
    counted: int
    positions: int
    swing: float  # the largest top-2 logit swing over all positions (reported, not judged)


def _difference(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return np.abs(reference.astype(np.float64) - candidate.astype(np.float64))


def rms(tensor: np.ndarray) -> float:
    """Root mean square of the whole tensor (0 for an empty one)."""
    if not tensor.size:
        return 0.0
    flat = tensor.astype(np.float64).ravel()
    # einsum, not `@`: see cosine.
    return float(np.sqrt(np.einsum("i,i->", flat, flat) / flat.size))


def _scale(reference: np.ndarray) -> float:
    """What errors are divided by: the reference's RMS, or 1 for an all-zero reference."""
    scale = rms(reference)
    return scale if scale > 0 else 1.0


def max_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    return float(_difference(reference, candidate).max(initial=0.0))


def mean_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    return float(_difference(reference, candidate).mean()) if reference.size else 0.0


def rel_max(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| / rms(reference)."""
    return max_abs(reference, candidate) / _scale(reference)


def rel_mean(reference: np.ndarray, candidate: np.ndarray) -> float:
    """mean |candidate - reference| / rms(reference)."""
    return mean_abs(reference, candidate) / _scale(reference)


def centered(logits: np.ndarray) -> np.ndarray:
    """Each row (last axis) minus its mean, in float64: logits up to the constant softmax ignores."""
    values = logits.astype(np.float64)
    return values - values.mean(axis=-1, keepdims=True)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("-inf")
    a, b = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    # einsum, not `@`/norm: those call multi-threaded BLAS, which on a busy 2-core machine took
    # 15 ms per product instead of 0.1 ms (its threads spin waiting for each other).
    denom = np.sqrt(np.einsum("i,i->", a, a) * np.einsum("i,i->", b, b))
    return float(np.einsum("i,i->", a, b) / denom) if denom else float(np.array_equal(a, b))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per position (last axis = vocabulary), in nats: the same as the
    difference of their log-probabilities. 0 at an exact tie; +inf for a one-word vocabulary."""
    if logits.shape[-1] < 2:
        return np.full(logits.shape[:-1], np.inf)
    top = np.partition(logits.astype(np.float64), -2, axis=-1)
    return top[..., -1] - top[..., -2]


def clear_top1(reference_logits: np.ndarray, candidate_logits: np.ndarray, margin: float) -> Agreement:
    """Arg-max agreement at the positions where the reference's top-2 margin exceeds `margin`
    (the variant's measured noise, from its profile — see the module docstring)."""
    positions = int(np.prod(reference_logits.shape[:-1])) if reference_logits.ndim else 0
    if reference_logits.shape != candidate_logits.shape:
        return Agreement(0.0, positions, positions, float("inf"))
    swing = float(logit_swing(reference_logits, candidate_logits).max(initial=0.0))
    clear = top2_margin(reference_logits) > margin
    counted = int(clear.sum())
    if not counted:
        return Agreement(1.0, 0, positions, swing)
    same = reference_logits.argmax(-1) == candidate_logits.argmax(-1)
    return Agreement(float(same[clear].mean()), counted, positions, swing)


def logit_swing(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """Per position, the top-2 logit swing: how much the candidate changes the gap between the
    reference's top-1 and top-2 tokens a and b, |(cand_a - cand_b) - (ref_a - ref_b)|. Its
    largest value over the positions of a correct variant on the real-weights model is that
    variant's `top1_margin` (a measurement, not part of any verdict: `check` reports it so a
    profile can be re-measured). A third token c, further below (ref_a - ref_c ≥ margin), would
    need a larger swing still to overtake a."""
    if reference_logits.shape != candidate_logits.shape:
        return np.full(reference_logits.shape[:-1], np.inf)
    if reference_logits.shape[-1] < 2:
        return np.zeros(reference_logits.shape[:-1])
    two = np.argpartition(reference_logits, -2, axis=-1)[..., -2:]  # the top-2 tokens, either order
    ref = np.take_along_axis(reference_logits.astype(np.float64), two, -1)
    got = np.take_along_axis(candidate_logits.astype(np.float64), two, -1)
    # |Δ(ref_a - ref_b)| is the same whichever of the two is a.
    return np.abs((got[..., 1] - got[..., 0]) - (ref[..., 1] - ref[..., 0]))


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Plain arg-max agreement at every position (no margin): a diagnostic, not a bound."""
    if reference_logits.shape != candidate_logits.shape:
        return 0.0
    return float((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).mean())


def kl_divergence(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) ‖ softmax(candidate)) in nats, one value per position (last axis = vocabulary)."""
    def log_softmax(logits: np.ndarray) -> np.ndarray:
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    ref, got = log_softmax(reference_logits), log_softmax(candidate_logits)
    # Clipped at 0: exact ties give -1e-17 from float rounding, and a divergence is never negative.
    return np.maximum((np.exp(ref) * (ref - got)).sum(-1), 0.0)


# Nats at one position: far above int8's typical 0.005 on the real-weights model, far below a
# position tipped into another state (2-5 nats: on its random-vision prefixes a few positions sit
# where any 8-bit perturbation tips the decoder, and they carry most of int8's mean).
KNIFE_EDGE = 1.0


def knife_edges(kl: np.ndarray) -> tuple[int, float]:
    """(positions over KNIFE_EDGE, the mean KL of the others): is a mean systematic or carried
    by a few positions?"""
    calm = kl[kl <= KNIFE_EDGE]
    return int(kl.size - calm.size), float(calm.mean()) if calm.size else 0.0


def present_values(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Every present (KV cache) tensor relative to its own RMS (layers differ in scale); the worst
    tensor for each metric: the largest relative errors, the lowest cosine. A different number of
    tensors is infinitely wrong."""
    if len(reference) != len(candidate):
        return {"rel_max": float("inf"), "rel_mean": float("inf"), "cosine": float("-inf")}
    return {
        "rel_max": max(map(rel_max, reference, candidate), default=0.0),
        "rel_mean": max(map(rel_mean, reference, candidate), default=0.0),
        "cosine": min(map(cosine, reference, candidate), default=1.0),
    }
