"""Configs that let other libraries load a bundle as it is: transformers.js (the `transformers.js`
layout, in LLaVA's form) and optimum (the distilvit layout's `language_model/`).

transformers.js (@huggingface/transformers 4.3.2, the version pinned in web/package.json) has
no prefix-conditioning class, but its LLaVA path expresses one exactly: `LlavaProcessor`
expands the text "<image>" into one image token per patch, `LlavaForConditionalGeneration`
(src/models/llava/modeling_llava.js) embeds the ids with `embed_tokens` and overwrites the
image tokens' rows with `vision_encoder`'s `image_features`
(`default_merge_input_ids_with_image_features`, src/models/modeling_utils.js), and the decoder
runs on those embeddings. With no text after the image tokens that is distilvit's prefix-only
conditioning: no BOS, no prompt, positions 0.. over the prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlmexport.checkpoint.load import Checkpoint
from vlmexport.errors import CheckpointError

IMAGE_TOKEN = "<image>"
PROCESSOR = "LlavaProcessor"


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def text_config(checkpoint: Checkpoint, lm: PreTrainedModel) -> dict[str, Any]:
    """The decoder's own config as a causal LM's config.json: transformers' full form, with the
    checkpoint's text_config on top (it keeps the names older transformers read, e.g. rope_theta)."""
    config = {**lm.config.to_dict(), **checkpoint.config.text_config}
    config.update(architectures=[type(lm).__name__], use_cache=True, tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    config.pop("_name_or_path", None)
    return config


def write_language_model_configs(out: Path, checkpoint: Checkpoint, lm: PreTrainedModel, generation: dict[str, Any]) -> None:
    """`language_model/config.json` (the text config) and `generation_config.json`, so that
    optimum's `ORTModelForCausalLM.from_pretrained(bundle, subfolder="language_model")` finds a
    model type it knows instead of falling back to the root's `prefix_conditioning_vlm`."""
    _dump(out / "language_model" / "config.json", text_config(checkpoint, lm))
    _dump(out / "language_model" / "generation_config.json", generation)


def add_image_token(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """Add the special token "<image>" (in place) and return its id: the first id past the
    tokenizer's, which must fit in the embed_tokens table (vocabulary + one row, graphs.EmbedTokensGraph).

    Raises:
        CheckpointError: the tokenizer has more tokens than the decoder's vocabulary.
    """
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if token_id > vocab_size:
        raise CheckpointError(
            f"the tokenizer has {token_id} tokens, more than the decoder's vocabulary of {vocab_size}",
            "export a checkpoint whose tokenizer matches its decoder, or use --layout distilvit",
        )
    return token_id


def write_transformers_js_configs(
    out: Path, checkpoint: Checkpoint, lm: PreTrainedModel, image_token_id: int, prefix_length: int
) -> None:
    """config.json (LLaVA's, with the text and vision configs and `transformers.js_config`),
    processor_config.json, and the processor class in preprocessor_config.json.

    The original prefix_conditioning_vlm config is kept under "prefix_conditioning_vlm".
    """
    vision = checkpoint.config.vision_config
    patch = int(vision.get("patch_size", 16))
    pre = checkpoint.preprocessor
    patches = (pre.height // patch) * (pre.width // patch)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token_id,
        "image_seq_length": prefix_length,
        "text_config": text_config(checkpoint, lm),
        "vision_config": vision,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        # A user who names no dtype gets fp32, which every bundle has; transformers.js' own
        # default on WebAssembly is q8 (`_quantized` files), which exist only after
        # `quantize --mode int8` (manifest.ALIASES) and are worth loading only once checked.
        "transformers.js_config": {"dtype": "fp32"},
        "prefix_conditioning_vlm": checkpoint.config.to_dict(),
    }
    _dump(out / "config.json", config)
    processor = {
        "processor_class": PROCESSOR,
        "image_token": IMAGE_TOKEN,
        "patch_size": patch,
        # LlavaProcessor expands "<image>" to (H/patch)·(W/patch) + this many tokens: one per prefix position.
        "num_additional_image_tokens": prefix_length - patches,
        "vision_feature_select_strategy": "full",
    }
    _dump(out / "processor_config.json", processor)
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    _dump(out / "preprocessor_config.json", {**preprocessor, "processor_class": PROCESSOR})
