"""Write a model in the distilvit checkpoint format (config.json, model.safetensors, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from vlmexport.bundle.preprocess import Preprocessor
from vlmexport.checkpoint.config import VLMConfig
from vlmexport.checkpoint.load import WEIGHTS_NAME, ignorable_keys
from vlmexport.checkpoint.model import PrefixConditioningVLM

# transformers 4.x ViT names, from the 5.x names (the reverse of transformers' ViT conversion table).
_VIT_4X_NAMES = (
    ("layers.", "encoder.layer."),
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)


def _legacy_vision_key(key: str, vision_type: str) -> str:
    # transformers 4.x nested SigLIP/CLIP vision weights under `vision_model.` and named ViT's
    # layers `encoder.layer.N.attention.attention.query` etc.; the loader reads either naming.
    if not key.startswith("vision_encoder."):
        return key
    if vision_type in ("siglip_vision_model", "clip_vision_model"):
        return "vision_encoder.vision_model." + key[len("vision_encoder.") :]
    if vision_type == "vit":
        for new, old in _VIT_4X_NAMES:
            key = key.replace(new, old, 1)
    return key


def model_state_for_saving(model: PrefixConditioningVLM, legacy_keys: bool = False) -> dict[str, torch.Tensor]:
    """State dict without tied copies (safetensors refuses shared storage), contiguous, optionally 4.x-named."""
    _, tied = ignorable_keys(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    if legacy_keys:
        state = {_legacy_vision_key(k, model.config.vision_type): v for k, v in state.items()}
    return state


def save_checkpoint(
    model: PrefixConditioningVLM,
    config: VLMConfig,
    tokenizer: PreTrainedTokenizerBase,
    preprocessor: Preprocessor | None,
    out_dir: Path,
    legacy_keys: bool = False,
) -> None:
    """Write config.json, model.safetensors, tokenizer files and (if given) preprocessor_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    save_file(model_state_for_saving(model, legacy_keys), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    if preprocessor is not None:
        preprocessor.write(out_dir)
