"""The metrics behind every verdict: relative errors that scale with the tensor, clear-margin
top-1 that counts only where the reference's choice is clear of the variant's noise."""

from __future__ import annotations

import numpy as np
import pytest

from vlmexport.errors import ParityError
from vlmexport.validate.metrics import clear_top1, logit_swing, rel_max, rel_mean, top2_margin


def test_relative_errors_do_not_change_with_the_models_scale() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 5, 8)).astype(np.float32)
    candidate = reference + 1e-3 * rng.standard_normal(reference.shape).astype(np.float32)
    for scale in (0.01, 1.0, 100.0):  # a toy model's activations and a pretrained one's
        assert np.isclose(rel_max(reference * scale, candidate * scale), rel_max(reference, candidate), rtol=1e-3)
        assert np.isclose(rel_mean(reference * scale, candidate * scale), rel_mean(reference, candidate), rtol=1e-3)
    rms = np.sqrt((reference.astype(np.float64) ** 2).mean())
    assert np.isclose(rel_max(reference, candidate), np.abs(candidate - reference).max() / rms, rtol=1e-5)


def test_a_zero_reference_compares_absolutely_and_a_shape_mismatch_is_infinite() -> None:
    zero = np.zeros((3, 4), np.float32)
    assert rel_max(zero, zero + 0.5) == 0.5 and rel_mean(zero, zero) == 0.0
    assert rel_max(zero, np.zeros((4, 3), np.float32)) == float("inf")


def test_clear_top1_counts_only_positions_whose_margin_exceeds_the_noise() -> None:
    reference = np.array([[3.0, 2.9, 0.0], [5.0, 1.0, 0.0], [0.0, 4.0, 1.0]])
    assert np.allclose(top2_margin(reference), [0.1, 4.0, 3.0])
    candidate = reference.copy()
    candidate[0] = [2.9, 3.0, 0.0]  # a near-tie flips: not counted at margin 0.5
    agreement = clear_top1(reference, candidate, 0.5)
    assert (agreement.rate, agreement.counted, agreement.positions) == (1.0, 2, 3)
    assert np.isclose(agreement.swing, 0.2)
    candidate[1] = [0.0, 6.0, 0.0]  # a clear choice flips: counted
    assert clear_top1(reference, candidate, 0.5).rate == 0.5
    # Nothing clear: agreement 1.0 by default, and the count says so.
    none = clear_top1(reference, candidate, 10.0)
    assert (none.rate, none.counted, none.positions) == (1.0, 0, 3)


def test_logit_swing_is_the_change_of_the_gap_between_the_references_top_two() -> None:
    reference = np.array([[1.0, 4.0, 3.0, -2.0]])
    candidate = np.array([[9.0, 4.5, 3.2, 7.0]])  # tokens outside the top two do not count
    assert np.allclose(logit_swing(reference, candidate), [0.3])


def test_logits_are_compared_up_to_the_shift_softmax_ignores() -> None:
    """A constant added to a row of logits changes no probability: check compares logits centered
    (a quantized decoder shifts whole rows; the captioner's int8 failed cosine on one such shift),
    while any other change still counts."""
    from vlmexport.validate.check import _logits_values
    from vlmexport.validate.metrics import cosine
    from vlmexport.validate.profiles import profile_named

    rng = np.random.default_rng(1)
    reference = 4.0 * rng.standard_normal((3, 2, 50))
    shifted = reference + 2.0 * rng.standard_normal((3, 2, 1))
    bounds = profile_named("int8").logits
    assert cosine(reference, shifted) < bounds.cosine  # raw, the shift alone would fail
    values = _logits_values(reference, shifted, bounds)
    assert values["rel_max"] < 1e-12 and values["cosine"] > 1 - 1e-12 and values["top1"].rate == 1.0
    wrong = shifted.copy()
    wrong[0, 0, 0] += 5.0
    assert _logits_values(reference, wrong, bounds)["rel_max"] > 1.0


@pytest.mark.parametrize(
    ("value", "tolerance", "said"),
    [
        (0.9998911, 0.9999, "cosine = 0.99989 is outside tolerance 0.9999"),  # at 3 digits both read 1
        (0.0373, 0.03, "cosine = 0.0373 is outside tolerance 0.03"),
    ],
)
def test_a_parity_error_tells_the_value_from_its_bound(value: float, tolerance: float, said: str) -> None:
    assert said in str(ParityError("projection projected_prefix", "cosine", value, tolerance))
