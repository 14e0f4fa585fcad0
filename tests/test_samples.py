"""The sample images and the real-weights checkpoint's grid dither: the measuring instruments."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from vlmexport.checkpoint.synth import dither_off_grid, grid_step
from vlmexport.quantize.feeds import CALIBRATION_IMAGES, CALIBRATION_SEED
from vlmexport.samples import sample_images


def test_sample_images_are_distinct_non_blank_and_reproducible() -> None:
    """A fidelity mean over 96 images must average 96 pictures (it once counted three textures 16 times each)."""
    images = sample_images(96, 64)
    digests = {hashlib.sha256(np.asarray(i).tobytes()).hexdigest() for i in images}
    assert len(digests) == 96
    assert all(np.asarray(i).std() > 0 for i in images)
    assert [np.asarray(i).tobytes() for i in sample_images(8, 64)] == [np.asarray(i).tobytes() for i in images[:8]]


def test_calibration_images_share_none_with_the_judged_ones() -> None:
    """GPTQ calibrates on another seed without the fixed textures (feeds.calibrate): with
    them, every seed repeats the gradient and the stripes that check and the fidelity bench judge."""

    def digests(images: list) -> set[str]:
        return {hashlib.sha256(np.asarray(i).tobytes()).hexdigest() for i in images}

    judged, calibration = digests(sample_images(96, 64)), digests(sample_images(CALIBRATION_IMAGES, 64, seed=CALIBRATION_SEED, fixed=False))
    assert len(calibration) == CALIBRATION_IMAGES and not judged & calibration
    assert judged & digests(sample_images(32, 64, seed=1))  # what fixed=False is for


def test_dither_moves_gguf_grids_off_and_no_further_than_half_a_step() -> None:
    """Q4_1 blocks (d·q + m, q in 0..15) and Q8_0 blocks (d·q, |q| ≤ 127) each move off their grid
    by at most half a step; a block on no grid is left alone."""
    g = torch.Generator().manual_seed(3)
    q4 = torch.randint(0, 16, (64, 32), generator=g).float()
    q4[:, 0], q4[:, 1] = 0, 15  # Q4_1's block minimum and maximum are codes 0 and 15
    d4, m4 = torch.rand(64, 1, generator=g) * 0.01 + 1e-3, -torch.rand(64, 1, generator=g) * 0.05
    q8 = torch.randint(-127, 128, (64, 32), generator=g).float()
    q8[:, 0] = 127
    d8 = torch.rand(64, 1, generator=g) * 1e-3 + 1e-4
    free = torch.randn(64, 32, generator=g)
    lm = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        lm[0].weight.copy_((q4 * d4 + m4).repeat(1, 2))  # two blocks a row
        lm[1].weight.copy_(q8 * d8)
        lm[2].weight.copy_(free)
    before = [m.weight.detach().clone() for m in lm]
    assert torch.allclose(grid_step(before[0].view(-1, 32)), d4.repeat_interleave(2, 0)) and torch.allclose(grid_step(before[1].view(-1, 32)), d8)
    assert (grid_step(before[2].view(-1, 32)) == 0).all()

    moved = dither_off_grid(lm, torch.Generator().manual_seed(0))

    assert moved == 64 * 2 + 64
    assert (grid_step(lm[0].weight.detach().view(-1, 32)) == 0).all()
    assert (grid_step(lm[1].weight.detach().view(-1, 32)) == 0).all()
    assert (lm[0].weight.detach() - before[0]).abs().max() <= (d4.max() / 2) * 1.0001
    assert ((lm[1].weight.detach() - before[1]).abs() <= d8 / 2 * 1.0001).all()
    assert torch.equal(lm[2].weight.detach(), before[2])
