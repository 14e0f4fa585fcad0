"""Random-weight distilvit-format checkpoints from presets in configs/presets/ (offline, seconds)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from vlmexport.bundle.preprocess import Preprocessor, derive_preprocessor
from vlmexport.checkpoint.config import MODEL_TYPE, VLMConfig, parse_config
from vlmexport.checkpoint.model import (
    ATTN_IMPLEMENTATION,
    PrefixConditioningVLM,
    Projection,
    build_model,
    build_vision_encoder,
    with_adapters,
)
from vlmexport.checkpoint.pretrained import check_text_config, load_gguf_decoder, pretrained_source
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.checkpoint.tokenizer import word_tokenizer
from vlmexport.errors import UsageError
from vlmexport.fsutil import atomic_output_dir, check_output_dir
from vlmexport.resources import configs_dir
from vlmexport.samples import sample_images

PRESET_DIR = configs_dir() / "presets"


@dataclass(frozen=True)
class SynthResult:
    path: Path
    parameters: int
    bytes: int


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_table(name: str) -> dict[str, Any]:
    """The preset file as it is written (with its base's tables when it `extends` one).

    Raises:
        UsageError: unknown preset name.
    """
    table = tomllib.loads(preset_file(name).read_text())
    # `extends = "other"`: the other preset's tables, with this file's tables replacing theirs.
    base = table.pop("extends", None)
    return {**preset_table(base), **table} if base else table


def preset_file(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown preset {name!r}", f"choose one of: {', '.join(preset_names())}")
    return path


def preset_files(name: str) -> list[Path]:
    """Every file that decides a preset: its .toml and data files (<name>.*), its base's too."""
    base = tomllib.loads(preset_file(name).read_text()).get("extends")
    return sorted(PRESET_DIR.glob(f"{name}.*")) + (preset_files(base) if base else [])


def load_preset(name: str) -> dict[str, Any]:
    """The preset as a distilvit config.json dict.

    Raises:
        UsageError: unknown preset name.
    """
    data = preset_table(name)
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


def pretrained_model(config: VLMConfig, table: dict[str, Any], seed: int = 0, load_trained: bool = True) -> tuple[PrefixConditioningVLM, Any]:
    """(model, tokenizer): the preset's pretrained decoder (see checkpoint.pretrained) under a
    random vision tower, non-zero LoRA, and the preset's trained projection (`[projection]
    weights`, see checkpoint.train_projection) — or, without one or with `load_trained` False, a
    random projection scaled to the decoder's embeddings.

    Raises:
        UsageError: the optional packages are missing, or the file has another shape.
    """
    source = pretrained_source(table["pretrained"])
    lm, tokenizer = load_gguf_decoder(source)
    check_text_config(lm, {k: v for k, v in config.text_config.items() if k != "model_type"}, source)
    lm.config._attn_implementation = ATTN_IMPLEMENTATION
    dither_off_grid(lm, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    vision = build_vision_encoder(config)
    projection = Projection(vision.config.hidden_size, int(lm.config.hidden_size), config.projection_type, config.mlp_hidden_dim)
    text_config = {**lm.config.to_dict(), "model_type": config.text_type}
    text_config.pop("quantization_config", None)
    config = dataclasses.replace(config, text_config=text_config, raw={**config.raw, "text_config": text_config})
    model = PrefixConditioningVLM(config, vision, projection, with_adapters(lm, config)).eval()
    _scale_projection(model)
    randomise_lora(model, torch.Generator().manual_seed(seed), float(table.get("lora", {}).get("b_std", 0.02)))
    trained = table.get("projection", {}).get("weights")
    if trained and load_trained:
        load_projection(model, derive_preprocessor(config.vision_config), PRESET_DIR / trained)
    return model, tokenizer


def untrained_model(preset: str, seed: int = 0) -> tuple[PrefixConditioningVLM, Any, Preprocessor]:
    """(model, tokenizer, preprocessor) of a pretrained preset as synth builds it, but with the
    scaled random projection instead of the trained one: what train_projection starts from."""
    table = preset_table(preset)
    if "pretrained" not in table:
        raise UsageError(f"preset {preset!r} has no pretrained decoder to train a projection for", f"choose one of: {', '.join(pretrained_presets())}")
    model, tokenizer = pretrained_model(parse_config(load_preset(preset)), table, seed, load_trained=False)
    return model, tokenizer, derive_preprocessor(model.config.vision_config)


def pretrained_presets() -> list[str]:
    return [name for name in preset_names() if "pretrained" in preset_table(name)]


# A trained projection file (see checkpoint.train_projection) carries the vision tower's probe.
PROBE_KEY = "vision_probe"
RETRAIN = "python -m vlmexport.checkpoint.train_projection"


@torch.no_grad()
def vision_probe(model: PrefixConditioningVLM, preprocessor: Preprocessor) -> torch.Tensor:
    """The vision tower's mean-pooled features of the first sample image [hidden]: stored beside a
    trained projection, it tells whether a rebuilt tower is the one the projection was trained on.
    A tolerance rather than a hash: the tower is rebuilt from a seed, and initialisation kernels
    may differ in the last bits between CPU kinds; another initialisation differs entirely."""
    pixels = torch.from_numpy(preprocessor(sample_images(1, preprocessor.height)))
    return model.vision_features(pixels).mean((0, 1))


def probe_matches(probe: torch.Tensor, stored: torch.Tensor, tolerance: float = 1e-2) -> bool:
    return bool((probe - stored.float()).norm() <= tolerance * stored.float().norm())


def load_projection(model: PrefixConditioningVLM, preprocessor: Preprocessor, path: Path) -> None:
    """Load a trained projection into `model` (float32).

    Raises:
        UsageError: the file is missing, or it was trained on another vision tower.
    """
    if not path.is_file():
        raise UsageError(f"the preset's trained projection {path.name} is missing", f"restore it from git, or retrain: {RETRAIN}")
    tensors = load_file(str(path))
    if not probe_matches(vision_probe(model, preprocessor), tensors.pop(PROBE_KEY)):
        raise UsageError(f"{path.name} was trained on another vision tower than this build makes (torch or transformers initialise it differently)", f"retrain it: {RETRAIN}")
    model.projection.load_state_dict({k.removeprefix("projection."): v.float() for k, v in tensors.items()})


# The GGUF's quantization grids, as (levels above the block's minimum, whether the grid is symmetric):
# Q4_1 stores w = d·q + m, q in 0..15; Q8_0 stores w = d·q, |q| ≤ 127 (d = max|w| / 127).
GRIDS = ((15, False), (127, True))


@torch.no_grad()
def dither_off_grid(lm: torch.nn.Module, generator: torch.Generator, block: int = 32) -> int:
    """Move every weight matrix of the GGUF decoder off its quantization grid: uniform noise of one
    grid step (±step/2) per block of `block` along the input axis. Returns how many blocks moved.

    Why: dequantized GGUF weights sit exactly on the grids of the recipes under test — Q4_1
    (210 of the file's matrices) is a 16-level grid per block of 32 that a 4-bit block-32
    quantizer with float zero points (HQQ) reproduces with zero error, and the tied table is
    Q8_0, exactly MatMulNBits' symmetric 8-bit blocks of 32 on the same axis (the int8 head lost
    nothing). A real fine-tuned checkpoint has no such grid, so those recipes were flattered. One
    step of uniform noise is, statistically, the rounding error the GGUF's quantizer removed:
    snapping back to the old grid now costs what rounding a continuous weight costs.
    Blocks on neither grid (none in this file) are left as they are.
    """
    moved = 0
    for module in lm.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or weight is None or weight.shape[-1] % block:
            continue
        blocks = weight.data.view(-1, block)
        step = grid_step(blocks)
        noise = torch.rand(blocks.shape, generator=generator, dtype=blocks.dtype) - 0.5
        blocks.add_(noise * step)
        moved += int((step > 0).sum())
    return moved


def grid_step(blocks: torch.Tensor) -> torch.Tensor:
    """Per row of `blocks` ([n, block]), the step of the GGUF grid (GRIDS) it sits on exactly, or
    0 where it sits on none: [n, 1]."""
    low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    step = torch.zeros_like(low)
    for levels, symmetric in GRIDS:
        d = (blocks.abs().amax(1, keepdim=True) if symmetric else high - low) / levels
        codes = blocks / d if symmetric else (blocks - low) / d
        on_grid = ((codes - codes.round()).abs() <= 1e-3).all(1, keepdim=True) & (d > 0) & (step == 0)
        step = torch.where(on_grid, d, step)
    return step


@torch.no_grad()
def _scale_projection(model: PrefixConditioningVLM) -> None:
    """Scale the projection so its outputs, on the sample images, have the RMS of the decoder's
    token embeddings: a prefix far off that scale would put the decoder where no text ever took it."""
    preprocessor = derive_preprocessor(model.config.vision_config)
    pixels = torch.as_tensor(preprocessor(sample_images(2, preprocessor.height)))
    prefix = model.prefix_embeddings(pixels)
    target = model.causal_lm.get_input_embeddings().weight.pow(2).mean().sqrt()
    # Rounded to 3 significant digits: the RMS is a multi-threaded reduction whose last bits vary
    # from run to run, and a 1-ulp change in the projection flips near-tied greedy tokens of the
    # fidelity set (int8 image KL measured 0.0097 on one build, 0.019 on another). The checkpoint
    # must be the same bytes on every build.
    factor = float(f"{float(target / prefix.pow(2).mean().sqrt()):.3g}")
    for module in model.projection.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.mul_(factor)
            module.bias.mul_(factor)
            break  # the first linear layer scales the whole (linear) projection


def synth_checkpoint(preset: str, output_dir: Path, seed: int = 0, force: bool = False, legacy_keys: bool = True) -> SynthResult:
    """Write a checkpoint with real (non-zero) LoRA adapters: random weights, or the preset's
    pretrained decoder when it names one (`[pretrained]`, see checkpoint.pretrained).

    `legacy_keys` writes transformers-4.x names (as real distilvit checkpoints have them).

    Raises:
        UsageError: unknown preset, occupied output folder, or a pretrained preset whose
            optional packages are missing.
    """
    table = preset_table(preset)
    config = parse_config(load_preset(preset))
    check_output_dir(output_dir, force)
    if "pretrained" in table:
        model, tokenizer = pretrained_model(config, table, seed)
        config = model.config
    else:
        model = random_model(config, seed)
        tokenizer = word_tokenizer([], vocab_size=int(config.text_config["vocab_size"]))
    with atomic_output_dir(output_dir, force) as tmp:
        save_checkpoint(model, config, tokenizer, derive_preprocessor(config.vision_config), tmp, legacy_keys)
        parameters = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return SynthResult(output_dir, parameters, size)
