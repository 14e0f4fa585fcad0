"""Error metrics between a reference tensor and an exported one."""

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

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.tolerance if self.higher_is_better else self.value <= self.tolerance


def max_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    return float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max(initial=0.0))


def mean_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    return float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).mean()) if reference.size else 0.0


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("-inf")
    a, b = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    # einsum, not `@`/norm: those call multi-threaded BLAS, which on a busy 2-core machine took
    # 15 ms per product instead of 0.1 ms (its threads spin waiting for each other).
    denom = np.sqrt(np.einsum("i,i->", a, a) * np.einsum("i,i->", b, b))
    return float(np.einsum("i,i->", a, b) / denom) if denom else float(np.array_equal(a, b))


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
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
