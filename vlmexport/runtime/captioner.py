"""`Captioner`: one variant of a bundle held open, captioning images a batch at a time.

What a batch engine keeps per worker (one per process, or a Ray Data actor), and what
`vlmexport serve` runs requests on. Sessions are opened once; ONNX Runtime's `run` is
thread-safe, so one Captioner may serve several threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import bundle_preprocessor, load_image, open_image, to_rgb
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.errors import ImageError
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.caption import caption_tokens

ImageLike = Image.Image | np.ndarray | bytes | Path | str


@dataclass(frozen=True)
class Caption:
    """One image's caption and its token ids (EOS excluded)."""

    text: str
    tokens: list[int]


def to_image(item: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, an HWC/HW uint8 array, encoded bytes or a file path.

    Raises:
        ImageError: the item is not an image (or the path does not exist).
    """
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        try:
            return to_rgb(Image.fromarray(item))
        except (TypeError, ValueError) as exc:
            raise ImageError(f"an array of shape {item.shape} and dtype {item.dtype} is not an image", "pass HxW or HxWx3/4 uint8 arrays") from exc
    if isinstance(item, bytes | bytearray | memoryview):
        return load_image(bytes(item))
    return open_image(item)


class Captioner:
    """One variant of the bundle in `onnx_dir`, opened once: tokenizer, preprocessing, sessions.

    >>> captioner = Captioner("onnx", variant="int8", threads=1)
    >>> captioner.caption(["a.png", "b.jpg"])
    ['a red circle on a blue background', ...]

    `threads` is ONNX Runtime's intra-op thread count per session (default: all cores); a pool
    of one worker per core wants 1. Called with a dict (a Ray Data `map_batches` batch), it reads
    the column `image` (arrays, as `read_images` gives) or `bytes` (as `read_binary_files`
    gives) and returns the batch with a `caption` column added.

    Raises:
        BundleError: no bundle, a variant it does not have, or a graph ONNX Runtime cannot load.
        CheckpointError: the bundle's tokenizer or preprocessing file is unreadable.
    """

    def __init__(self, onnx_dir: Path | str, variant: str = "fp32", threads: int | None = None, options: DecodeOptions | None = None) -> None:
        self.onnx_dir = Path(onnx_dir)
        self.variant = variant
        self.bundle = open_bundle(self.onnx_dir, variant, threads)
        self.preprocessor = bundle_preprocessor(self.onnx_dir)
        self.tokenizer = load_tokenizer(self.onnx_dir)
        self.options = options or DecodeOptions()

    @property
    def max_length(self) -> int:
        """The model's max_length: the default (and the server's cap) for max_new_tokens."""
        return int(self.bundle.manifest.model["max_length"])

    def caption_details(self, images: Iterable[ImageLike], options: DecodeOptions | None = None) -> list[Caption]:
        """Caption and tokens per image, in order.

        Raises:
            ImageError: an item is not an image.
        """
        pixels = self.preprocessor([to_image(item) for item in images])
        if not len(pixels):
            return []
        tokens = caption_tokens(self.bundle, pixels, options or self.options)
        return [Caption(text, ids) for text, ids in zip(decode(self.tokenizer, tokens), tokens)]

    def caption(self, images: Iterable[ImageLike], options: DecodeOptions | None = None) -> list[str]:
        """One caption per image, in order (see `caption_details`)."""
        return [c.text for c in self.caption_details(images, options)]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A batch engine's call: the batch's `image` or `bytes` column captioned into `caption`.

        Raises:
            ImageError: neither column is present, or an item is not an image.
        """
        column = next((name for name in ("image", "bytes") if name in batch), None)
        if column is None:
            raise ImageError(f"the batch has no `image` or `bytes` column (columns: {', '.join(batch)})", "read images with read_images or read_binary_files")
        return {**batch, "caption": np.asarray(self.caption(list(batch[column])), dtype=object)}
