"""The distilvit checkpoint's config.json, parsed and validated as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmexport.errors import CheckpointError

MODEL_TYPE = "prefix_conditioning_vlm"

# distilvit's defaults when `lora_target_modules` is null, keyed by decoder model_type.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "opt": ["q_proj", "v_proj"],
}
FALLBACK_LORA_TARGETS = ["q_proj", "v_proj"]

SUPPORTED_VISION = ("siglip_vision_model", "vit", "clip_vision_model")
SUPPORTED_TEXT = ("llama", "mistral", "qwen2", "gpt2", "opt")
PROJECTION_TYPES = ("linear", "mlp")


@dataclass(frozen=True)
class VLMConfig:
    """What config.json says about the model; `raw` keeps every field for writing back."""

    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    projection_type: str = "linear"
    mlp_hidden_dim: int | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    max_length: int = 30
    lora_merged: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vision_type(self) -> str:
        return self.vision_config["model_type"]

    @property
    def text_type(self) -> str:
        return self.text_config["model_type"]

    def lora_targets(self) -> list[str]:
        if self.lora_target_modules:
            return list(self.lora_target_modules)
        return DEFAULT_LORA_TARGETS.get(self.text_type, FALLBACK_LORA_TARGETS)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(
            model_type=MODEL_TYPE,
            vision_config=self.vision_config,
            text_config=self.text_config,
            projection_type=self.projection_type,
            mlp_hidden_dim=self.mlp_hidden_dim,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=self.lora_target_modules,
            max_length=self.max_length,
            lora_merged=self.lora_merged,
        )
        return out


def parse_config(data: dict[str, Any], source: str = "config.json") -> VLMConfig:
    """Validate a config dict and return it as a VLMConfig.

    Raises:
        CheckpointError: wrong model_type, missing sub-configs, unsupported architectures.
    """
    if data.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{source} has model_type {data.get('model_type')!r}, not {MODEL_TYPE!r}",
            "point --model-dir at a distilvit PrefixConditioningVLM checkpoint",
        )
    for key in ("vision_config", "text_config"):
        if not isinstance(data.get(key), dict) or "model_type" not in data[key]:
            raise CheckpointError(f"{source} lacks a {key} dict with a model_type", "re-save the checkpoint with distilvit")
    vision_type, text_type = data["vision_config"]["model_type"], data["text_config"]["model_type"]
    if vision_type not in SUPPORTED_VISION:
        raise CheckpointError(
            f"unsupported vision encoder {vision_type!r}", f"vlmexport supports {', '.join(SUPPORTED_VISION)}"
        )
    if text_type not in SUPPORTED_TEXT:
        raise CheckpointError(f"unsupported decoder {text_type!r}", f"vlmexport supports {', '.join(SUPPORTED_TEXT)}")
    projection_type = data.get("projection_type", "linear")
    if projection_type not in PROJECTION_TYPES:
        raise CheckpointError(f"unknown projection_type {projection_type!r}", "use 'linear' or 'mlp'")
    return VLMConfig(
        vision_config=data["vision_config"],
        text_config=data["text_config"],
        projection_type=projection_type,
        mlp_hidden_dim=data.get("mlp_hidden_dim"),
        lora_r=int(data.get("lora_r") or 16),
        lora_alpha=int(data.get("lora_alpha") or 32),
        lora_dropout=float(data.get("lora_dropout") or 0.0),
        lora_target_modules=data.get("lora_target_modules"),
        max_length=int(data.get("max_length") or 30),
        lora_merged=bool(data.get("lora_merged", False)),
        raw=data,
    )


def read_config(model_dir: Path) -> VLMConfig:
    """Read and validate `model_dir/config.json`.

    Raises:
        CheckpointError: the folder or file is missing, unreadable, or not a distilvit config.
    """
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist", "pass --model-dir pointing at a checkpoint folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", "a distilvit checkpoint folder holds config.json beside model.safetensors")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", "restore config.json from the training run") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object", "restore config.json from the training run")
    return parse_config(data, source=str(path))
