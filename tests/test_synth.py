"""Model presets in configs/presets/ and `vlmexport synth`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmexport.checkpoint.config import SUPPORTED_TEXT, SUPPORTED_VISION, parse_config
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.checkpoint.model import build_model
from vlmexport.checkpoint.synth import PRESET_DIR, PROBE_KEY, load_preset, preset_names, preset_table
from vlmexport.cli import main

FULL_SIZE = "smollm-135m-siglip-base"

# Parameter counts of the published models, derived from their config.json shapes.
SIGLIP_BASE_VISION = 92_884_224  # google/siglip-base-patch16-224 vision tower, incl. its attention-pooling head
SIGLIP_BASE_VISION_HEAD = 7_087_104
SMOLLM_135M = 134_515_008  # HuggingFaceTB/SmolLM-135M, tied head counted once
LINEAR_PROJECTION = 768 * 576 + 576
# LoRA r=16 on q,k,v,o of 30 layers: r * (in + out) per module; k and v project 576 → 3 heads * 64 = 192.
LORA = 30 * 16 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_are_found():
    assert {"tiny", FULL_SIZE} <= set(preset_names())
    assert len(preset_names()) == len(list(PRESET_DIR.glob("*.toml")))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_parses_and_builds(name):
    config = parse_config(load_preset(name), source=f"{name}.toml")
    assert config.vision_type in SUPPORTED_VISION and config.text_type in SUPPORTED_TEXT
    with torch.device("meta"):  # shapes only: the full-size preset would take ~1 GB
        model = build_model(config, with_lora=True)
    assert model.has_lora and count(model) > 0
    assert config.lora_targets(), "LoRA targets resolve to a non-empty list"


TRAINED = [name for name in preset_names() if "projection" in preset_table(name)]


@pytest.mark.parametrize("name", TRAINED)
def test_every_trained_projection_fits_its_preset(name):
    """A preset's shipped projection (checkpoint.train_projection) has exactly its projection's
    tensors and a vision probe of the tower's width (synth loads it into a real model)."""
    config = parse_config(load_preset(name), source=f"{name}.toml")
    with torch.device("meta"):
        model = build_model(config, with_lora=True)
    with safe_open(str(PRESET_DIR / preset_table(name)["projection"]["weights"]), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        assert "settings" in (handle.metadata() or {}), "the file records how it was trained"
    expected = {f"projection.{k}": tuple(v.shape) for k, v in model.projection.state_dict().items()}
    assert shapes == {**expected, PROBE_KEY: (model.vision_encoder.config.hidden_size,)}


def test_full_size_preset_has_siglip_base_and_smollm_135m_shapes():
    with torch.device("meta"):
        model = build_model(parse_config(load_preset(FULL_SIZE)), with_lora=True)
    text = model.causal_lm.config
    assert (text.vocab_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (49152, 30, 9, 3)
    assert (text.hidden_size, text.intermediate_size, text.tie_word_embeddings) == (576, 1536, True)
    assert model.causal_lm.lm_head.weight is model.causal_lm.get_input_embeddings().weight
    vision = model.vision_encoder.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (768, 12, 224, 16)

    assert count(model.vision_encoder) == SIGLIP_BASE_VISION
    assert count(model.projection) == LINEAR_PROJECTION
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert lora == LORA
    assert count(model.language_model) - lora == SMOLLM_135M
    expected = SIGLIP_BASE_VISION + SMOLLM_135M + LINEAR_PROJECTION + LORA
    assert abs(count(model) - expected) <= 0.05 * expected
    # For the record: without the pooling head (which distilvit never uses) the tower is ~85.8M.
    assert count(model.vision_encoder.head) == SIGLIP_BASE_VISION_HEAD


def test_synth_tiny_writes_a_loadable_checkpoint_with_nonzero_lora_b(tmp_path, capfd):
    output = tmp_path / "synth"
    assert main(["synth", "--preset", "tiny", "--output-dir", str(output)]) == 0
    assert "81,408" in capfd.readouterr().out  # the parameter count is reported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        lora_b = {k: handle.get_tensor(k) for k in keys if ".lora_B." in k}
    assert any(k.startswith("vision_encoder.vision_model.") for k in keys)  # written with 4.x names, like distilvit
    assert len(lora_b) == 2 * 4 and all(t.abs().min() > 0 for t in lora_b.values())

    checkpoint = load_checkpoint(output)
    assert checkpoint.model.has_lora
    assert json.loads((output / "config.json").read_text())["model_type"] == "prefix_conditioning_vlm"
    assert (output / "preprocessor_config.json").is_file()
    assert checkpoint.preprocessor([Image.new("RGB", (40, 30))]).shape == (1, 3, 32, 32)


def test_synth_is_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["synth", "--preset", "tiny", "--seed", str(seed), "--output-dir", str(tmp_path / name)]) == 0
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]


def test_unknown_preset_exits_2_naming_the_choices(tmp_path, capfd):
    output = tmp_path / "synth"
    assert main(["synth", "--preset", "nope", "--output-dir", str(output)]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "unknown preset 'nope'" in err and "tiny" in err and FULL_SIZE in err
    assert not output.exists() and list(tmp_path.iterdir()) == []
