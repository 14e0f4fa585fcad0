"""Caption image files with an ONNX bundle: the bundle's own preprocessing, tokenizer and graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import bundle_preprocessor, open_image
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.runtime.bundle import Bundle, open_bundle
from vlmexport.runtime.generate import generate

BATCH_SIZE = 8
# Dynamic quantization (the `dynamic` recipe) measures one activation scale per tensor, i.e. over
# the whole batch: an image's caption would depend on the images batched with it. One image per
# pass keeps such captions reproducible (and equal to the browser's, which runs one image at a
# time). Blockwise MatMulNBits quantizes each row on its own, so its variants batch freely.
BATCH_DEPENDENT_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul"})


def batch_dependent(bundle: Bundle) -> bool:
    """Whether a graph of the bundle's variant shares activation scales across a batch (the manifest lists every file's ops)."""
    files = bundle.manifest.files
    ops = {op.split(".")[-1] for relative in bundle.manifest.variants[bundle.variant].values() for op in files.get(relative, {}).get("ops", [])}
    return bool(ops & BATCH_DEPENDENT_OPS)


def caption_tokens(bundle: Bundle, pixel_values: np.ndarray, options: DecodeOptions, batch_size: int = BATCH_SIZE) -> list[list[int]]:
    """Token ids per image, `batch_size` images per pass; EOS/PAD and the default length from the manifest."""
    facts = bundle.manifest.model
    options = options.with_default_length(int(facts["max_length"]))
    rng = np.random.default_rng(options.seed)  # one stream across batches, so batches do not repeat draws
    if batch_dependent(bundle):
        batch_size = 1
    tokens: list[list[int]] = []
    for start in range(0, len(pixel_values), batch_size):
        prefix = bundle.prefix(pixel_values[start : start + batch_size])
        tokens += generate(bundle, prefix, options, facts["eos_token_id"], facts["pad_token_id"], rng)
    return tokens


def caption_images(
    onnx_dir: Path, images: list[Path], variant: str = "fp32", options: DecodeOptions = DecodeOptions(), batch_size: int = BATCH_SIZE
) -> list[str]:
    """One caption per image file, from the bundle in `onnx_dir` (any layout, any variant present).

    Raises:
        ImageError: an image cannot be read (checked before the bundle loads).
        BundleError: no bundle, a variant it does not have, or a graph ONNX Runtime cannot load.
        CheckpointError: the bundle's tokenizer or preprocessor file is unreadable.
    """
    opened = [open_image(p) for p in images]
    onnx_dir = Path(onnx_dir)
    bundle = open_bundle(onnx_dir, variant)
    pixels = bundle_preprocessor(onnx_dir)(opened)
    tokens = caption_tokens(bundle, pixels, options, batch_size)
    return decode(load_tokenizer(onnx_dir), tokens)
