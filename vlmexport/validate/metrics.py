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
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    if reference_logits.shape != candidate_logits.shape:
        return 0.0
    return float((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).mean())
