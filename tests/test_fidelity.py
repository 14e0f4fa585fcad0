"""fidelity.compare tells a systematic error from a few knife-edge positions."""

from __future__ import annotations

import numpy as np

from vlmexport.quantize.fidelity import KNIFE_EDGE, FidelitySet, compare


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
