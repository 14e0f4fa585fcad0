"""Caption image files with the PyTorch reference model."""

from __future__ import annotations

from pathlib import Path

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import open_image
from vlmexport.bundle.tokenizer import decode
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint


def caption_images_torch(
    model_dir: Path, images: list[Path], options: DecodeOptions = DecodeOptions(), allow_pickle: bool = False
) -> list[str]:
    """One caption per image, prefix-only (distilvit's generation); greedy unless `options` say
    otherwise, up to the config's max_length unless `options.max_new_tokens` is set.

    Raises:
        ImageError: an image cannot be read (checked before the model loads).
        CheckpointError: the checkpoint cannot be loaded.
    """
    opened = [open_image(p) for p in images]
    checkpoint = load_checkpoint(model_dir, allow_pickle)
    tokens = generate_tokens(checkpoint.model, checkpoint.tokenizer, checkpoint.preprocessor(opened), options)
    return decode(checkpoint.tokenizer, tokens)
