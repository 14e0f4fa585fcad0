"""distilvit's PrefixConditioningVLM, re-implemented: vision encoder → projection → causal LM.

distilvit is not a dependency; this module builds the same module tree (so the
same state-dict keys) from the checkpoint's config with transformers' own model
classes, and PEFT's LoRA wrapper when the checkpoint carries adapters.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vlmexport.checkpoint.config import VLMConfig

# Explicit dispatch by vision model_type: (config class, model class).
VISION_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "vit": (ViTConfig, ViTModel),
}

# Attention is built as plain matmul + softmax ("eager"): it is what the TorchScript ONNX
# exporter traces correctly for grouped KV heads, and what the ONNX graphs compute.
ATTN_IMPLEMENTATION = "eager"


class Projection(nn.Module):
    """Maps vision features to the decoder's embedding width (keys `projection.projection.*`)."""

    def __init__(self, vision_dim: int, text_dim: int, kind: str = "linear", hidden_dim: int | None = None) -> None:
        super().__init__()
        if kind == "mlp":
            hidden = hidden_dim or text_dim
            self.projection: nn.Module = nn.Sequential(
                nn.Linear(vision_dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, text_dim)
            )
        else:
            self.projection = nn.Linear(vision_dim, text_dim)

    def forward(self, vision_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projection(vision_hidden_states)


class PrefixConditioningVLM(nn.Module):
    """Vision features, projected, become the decoder's `inputs_embeds` prefix."""

    def __init__(self, config: VLMConfig, vision_encoder: PreTrainedModel, projection: Projection, language_model: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = vision_encoder
        self.projection = projection
        self.language_model = language_model

    @property
    def has_lora(self) -> bool:
        return isinstance(self.language_model, PeftModel)

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM, under the PEFT wrapper if there is one."""
        lm = self.language_model
        return lm.get_base_model() if isinstance(lm, PeftModel) else lm

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(pixel_values=pixel_values).last_hidden_state

    def prefix_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_features(pixel_values))


def build_vision_encoder(config: VLMConfig) -> PreTrainedModel:
    config_cls, model_cls = VISION_CLASSES[config.vision_type]
    fields = {k: v for k, v in config.vision_config.items() if k != "model_type"}
    vision_config = config_cls(**fields)
    vision_config._attn_implementation = ATTN_IMPLEMENTATION
    return model_cls(vision_config)


def build_text_config(config: VLMConfig) -> PretrainedConfig:
    fields = {k: v for k, v in config.text_config.items() if k != "model_type"}
    return CONFIG_MAPPING[config.text_type](**fields)


def build_language_model(config: VLMConfig, with_lora: bool) -> nn.Module:
    """The decoder from `text_config`, wrapped with LoRA when the checkpoint has adapters."""
    text_config = build_text_config(config)
    lm = AutoModelForCausalLM.from_config(text_config, attn_implementation=ATTN_IMPLEMENTATION)
    return with_adapters(lm, config) if with_lora else lm


def with_adapters(lm: PreTrainedModel, config: VLMConfig) -> nn.Module:
    """`lm` wrapped in PEFT LoRA adapters as the config describes (B starts at zero, as PEFT does)."""
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets(),
        # GPT-2 stores its attention weights as Conv1D (in, out); PEFT must know.
        fan_in_fan_out=config.text_type == "gpt2",
        bias="none",
    )
    return get_peft_model(lm, lora)


def hidden_size(model_config: dict) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if key in model_config:
            return int(model_config[key])
    raise KeyError("hidden_size")


def build_model(config: VLMConfig, with_lora: bool) -> PrefixConditioningVLM:
    """A randomly initialised model with the module tree the checkpoint's keys describe."""
    vision = build_vision_encoder(config)
    text_dim = int(config.text_config.get("word_embed_proj_dim") or hidden_size(config.text_config))
    projection = Projection(vision.config.hidden_size, text_dim, config.projection_type, config.mlp_hidden_dim)
    lm = build_language_model(config, with_lora)
    return PrefixConditioningVLM(config, vision, projection, lm).eval()
