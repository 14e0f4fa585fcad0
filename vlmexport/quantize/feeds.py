"""Real inputs for every graph of a bundle: what captioning the bundled sample images feeds each one.

Measuring activation ranges (fp16) needs each graph's inputs as the decoding loop produces
them — the prefix pass, then cached steps — so the fp32 bundle captions sample images while
its sessions record what they are fed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmexport.bundle.preprocess import bundle_preprocessor
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.generate import greedy
from vlmexport.samples import sample_images

IMAGES = 4
STEPS = 6


class _Recording:
    """An onnxruntime session that keeps a copy of every feed it is given."""

    def __init__(self, session: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self.session, self.sink = session, sink

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.sink.append({name: np.array(value) for name, value in feeds.items()})
        return self.session.run(outputs, feeds)


def recorded_feeds(onnx_dir: Path, images: int = IMAGES, steps: int = STEPS) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per fp32 component, the feeds of one batch of sample images captioned for `steps` tokens.

    Raises:
        BundleError: the fp32 bundle cannot be opened.
    """
    bundle = open_bundle(onnx_dir, "fp32")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in bundle.sessions}
    bundle.sessions = {name: _Recording(s, feeds[name]) for name, s in bundle.sessions.items()}
    preprocessor = bundle_preprocessor(onnx_dir)
    pixels = preprocessor(sample_images(images, preprocessor.height))
    # eos=None: decode every step, so the cached-step graph is measured as often as asked.
    greedy(bundle, bundle.prefix(pixels), steps, None, bundle.manifest.model["pad_token_id"])
    return feeds
