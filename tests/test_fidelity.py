"""fidelity.compare tells a systematic error from a few knife-edge positions; end_to_end judges a
whole variant, caption by caption."""
# ruff: noqa: F811 — `export_tiny` is test_export's session fixture, imported to share its bundles

from __future__ import annotations

import shutil

import numpy as np
from test_export import export_tiny  # noqa: F401

from vlmexport.bundle.decoding import strip_after_eos
from vlmexport.quantize.fidelity import (
    FidelitySet,
    compare,
    end_to_end,
    fidelity_set,
    noisy_prefixes,
    nudged,
    prefix_error,
    sources,
)
from vlmexport.quantize.quantize import quantize_bundle
from vlmexport.runtime.bundle import open_bundle
from vlmexport.validate.metrics import KNIFE_EDGE


def test_compare_counts_knife_edge_positions_apart_from_the_median() -> None:
    rng = np.random.default_rng(0)
    reference = [rng.normal(0, 3, (10, 50)).astype(np.float32) for _ in range(3)]
    fset = FidelitySet(prefixes=[], ids=[], reference=reference, images=2, pixels=np.zeros((2, 3, 4, 4), np.float32))
    close = [r + rng.normal(0, 0.01, r.shape).astype(np.float32) for r in reference]
    flipped = [c.copy() for c in close]
    flipped[1][4] = np.roll(reference[1][4], 7) * 3  # one position in another state entirely

    calm, edged = compare(fset, close, margin=1.0), compare(fset, flipped, margin=1.0)

    assert calm.knife_edges == 0 and edged.knife_edges == 1
    assert edged.kl > 10 * calm.kl  # the mean follows the one position ...
    assert edged.kl_median < KNIFE_EDGE / 100 and abs(edged.kl_median - calm.kl_median) < 1e-3  # ... the median does not
    assert abs(edged.kl_off_edges - calm.kl) < 1e-3  # ... nor the mean of the other positions


def test_a_draw_moves_every_pixel_by_one_ulp_and_nothing_else() -> None:
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    pixels[0, 0, 0, :3] = [0.0, -0.0, 1e-45]  # zero and the smallest subnormal move too
    fset = FidelitySet(prefixes=[np.ones((1, 4, 2), np.float32)], ids=[np.array([[1, 2]])], reference=[np.zeros((2, 5), np.float32)], images=2, pixels=pixels)

    assert nudged(fset, 0) is fset
    one, again, two = nudged(fset, 1), nudged(fset, 1), nudged(fset, 2)
    for draw in (one, two):
        assert draw.pixels.dtype == np.float32 and draw.pixels.shape == pixels.shape
        up = draw.pixels == np.nextafter(pixels, np.float32(np.inf))
        down = draw.pixels == np.nextafter(pixels, np.float32(-np.inf))
        assert np.all(up | down) and 0.4 < up.mean() < 0.6  # each value one ulp away, either way
        assert draw.ids is fset.ids and draw.reference is fset.reference and draw.prefixes is fset.prefixes  # fp32's side unmoved
    assert np.array_equal(one.pixels, again.pixels) and not np.array_equal(one.pixels, two.pixels)


def test_caption_positions_end_at_fp32s_eos() -> None:
    """A flip after fp32's EOS counts among all positions, not among the caption's."""
    rng = np.random.default_rng(1)
    reference = [rng.normal(0, 3, (6, 50)).astype(np.float32) for _ in range(2)]
    eos = 9
    ids = [np.array([[5, 6, eos, 7, 8, 1]]), np.array([[5, 6, 7, 8, 1, 2]])]  # the second never ends
    fset = FidelitySet(prefixes=[], ids=ids, reference=reference, images=2, pixels=np.zeros((2, 3, 4, 4), np.float32), eos=eos)
    got = [r.copy() for r in reference]
    got[0][4] = np.roll(reference[0][4], 7) * 3  # after the EOS at position 2

    result = compare(fset, got, margin=1.0)

    assert fset.caption_lengths() == [3, 6]
    assert strip_after_eos([5, eos, 6, eos], eos, keep_eos=True) == [5, eos] and strip_after_eos([5, 6], eos, keep_eos=True) == [5, 6]
    assert result.knife_edges == 1 and result.knife_edges_captions == 0 and result.kl_captions < 1e-6


def test_checks_goal_note_says_what_the_knife_edges_carry() -> None:
    """`check` reports int8's target_kl with the positions over KNIFE_EDGE and the others' mean."""
    from vlmexport.validate.check import _target_note
    from vlmexport.validate.profiles import profile_named

    kl = np.full(100, 0.004)
    kl[[7, 42]] = 3.0  # two tipped positions: mean 0.0639, the others 0.004

    (note,) = _target_note(kl, profile_named("int8"), images=4)

    assert "mean KL 0.0639 misses the profile's target_kl 0.01" in note
    assert "2 of 100 positions over 1 nat, the others' mean 0.004 " in note
    assert _target_note(kl, profile_named("fp32"), images=4) == []  # no goal, no note


def test_end_to_end_keeps_each_images_caption_verdict(export_tiny, tmp_path) -> None:
    """bench/fidelity_bench.py splits the caption rate into shapes (even) and textures (odd),
    and (--sources) judges a variant's decoder and prefixes apart."""
    bundle = tmp_path / "onnx"
    shutil.copytree(export_tiny("compact"), bundle)
    quantize_bundle(bundle, "q4", verify=False)
    fset = fidelity_set(bundle, images=4, tokens=6)

    same = end_to_end(fset, open_bundle(bundle, "fp32"), margin=1.0)
    q4 = end_to_end(fset, open_bundle(bundle, "q4"), margin=1.0)

    assert same.caption_matches == (True,) * 4 and same.captions_equal == 1.0 and same.kl == 0.0
    assert len(q4.caption_matches) == 4 and q4.captions_equal == np.mean(q4.caption_matches) and q4.kl > 0.0

    # Where q4's error comes from: its decoder and its prefixes apart, and fp32 under noise.
    fp32, variant = open_bundle(bundle, "fp32"), open_bundle(bundle, "q4")
    found = sources(fset, fp32, variant, margin=1.0, scales=(1.0, 0.0))
    itself = sources(fset, fp32, fp32, margin=1.0)

    assert found.prefix_error > 0.0 and found.decoder.kl > 0.0 and found.prefix.kl > 0.0 and found.noise[1.0].kl > 0.0
    assert found.decoder.kl_text == q4.kl_text > 0.0  # q4's decoder reads the text ...
    assert found.prefix.kl_text == found.noise[1.0].kl_text == 0.0  # ... fp32's decoder, on unchanged text rows
    assert found.noise[0.0].kl == 0.0 and found.noise[0.0].captions_equal == 1.0  # no noise, fp32 exactly
    assert itself.prefix_error == 0.0 and itself.decoder.kl == itself.prefix.kl == itself.noise[1.0].kl == 0.0
    noisy = noisy_prefixes(fset, 0.02)
    for got, ref in zip(noisy[: fset.images], fset.prefixes[: fset.images], strict=True):
        assert abs(np.linalg.norm(got - ref) / np.linalg.norm(ref) - 0.02) < 1e-4  # each image's noise is the size asked for
    assert abs(prefix_error(fset, noisy) - 0.02) < 1e-4
    assert len(noisy) == len(fset.prefixes) and all(np.array_equal(a, b) for a, b in zip(noisy[fset.images :], fset.prefixes[fset.images :]))
