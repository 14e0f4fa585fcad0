"""Random-weight distilvit-format checkpoints from presets in configs/presets/ (offline, seconds)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from vlmexport.checkpoint.config import MODEL_TYPE, VLMConfig, parse_config
from vlmexport.checkpoint.model import PrefixConditioningVLM, build_model
from vlmexport.checkpoint.preprocess import derive_preprocessor
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.checkpoint.tokenizer import word_tokenizer
from vlmexport.errors import UsageError
from vlmexport.fsutil import atomic_output_dir
from vlmexport.resources import configs_dir

PRESET_DIR = configs_dir() / "presets"


@dataclass(frozen=True)
class SynthResult:
    path: Path
    parameters: int
    bytes: int


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset as a distilvit config.json dict.

    Raises:
        UsageError: unknown preset name.
    """
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown preset {name!r}", f"choose one of: {', '.join(preset_names())}")
    data = tomllib.loads(path.read_text())
    lora = data.get("lora", {})
    return {
        "model_type": MODEL_TYPE,
        "vision_config": data["vision"],
        "text_config": data["text"],
        "projection_type": data.get("projection_type", "linear"),
        "mlp_hidden_dim": data.get("mlp_hidden_dim"),
        "lora_r": lora.get("r", 16),
        "lora_alpha": lora.get("alpha", 32),
        "lora_dropout": lora.get("dropout", 0.0),
        "lora_target_modules": lora.get("target_modules"),
        "max_length": data.get("max_length", 30),
        "freeze_vision_encoder": True,
        "vision_unfreeze_layers": 0,
    }


def randomise_lora(model: PrefixConditioningVLM, generator: torch.Generator, scale: float = 0.02) -> None:
    """PEFT starts LoRA B at zero (a no-op adapter); give B real values so merging matters."""
    for module in model.language_model.modules():
        if isinstance(module, LoraLayer):
            for lora_b in module.lora_B.values():
                with torch.no_grad():
                    lora_b.weight.normal_(0.0, scale, generator=generator)


def random_model(config: VLMConfig, seed: int = 0) -> PrefixConditioningVLM:
    torch.manual_seed(seed)
    model = build_model(config, with_lora=True)
    randomise_lora(model, torch.Generator().manual_seed(seed))
    return model


def synth_checkpoint(preset: str, output_dir: Path, seed: int = 0, force: bool = False, legacy_keys: bool = True) -> SynthResult:
    """Write a random-weight checkpoint with real (non-zero) LoRA adapters.

    `legacy_keys` writes transformers-4.x names (as real distilvit checkpoints have them).

    Raises:
        UsageError: unknown preset or occupied output folder.
    """
    config = parse_config(load_preset(preset))
    vocab = int(config.text_config["vocab_size"])
    with atomic_output_dir(output_dir, force) as tmp:
        model = random_model(config, seed)
        tokenizer = word_tokenizer([], vocab_size=vocab)
        save_checkpoint(model, config, tokenizer, derive_preprocessor(config.vision_config), tmp, legacy_keys)
        parameters = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return SynthResult(output_dir, parameters, size)
