"""Loading distilvit checkpoints: key namings, projections, decoders, vision encoders, merged
checkpoints, tied heads, and preprocessing against transformers' own image processors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil, ViTImageProcessorPil

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import PREPROCESSOR_NAME, open_image
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.merge import teacher_forced_logits
from vlmexport.samples import sample_images

DECODERS = ["llama", "gpt2", "opt"]
VISION_ENCODERS = ["siglip_vision_model", "vit", "clip_vision_model"]
# distilvit's LoRA targets when lora_target_modules is null (DESIGN §2).
DEFAULT_TARGETS = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj"}, "gpt2": {"c_attn", "c_proj"}, "opt": {"q_proj", "v_proj"}}


def file_keys(checkpoint_dir: Path) -> list[str]:
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def pixels(checkpoint: Checkpoint, count: int = 6, seed: int = 1) -> np.ndarray:
    return checkpoint.preprocessor(sample_images(count, checkpoint.preprocessor.height, seed=seed))


def greedy(checkpoint: Checkpoint, pixel_values: np.ndarray) -> list[list[int]]:
    return generate_tokens(checkpoint.model, checkpoint.tokenizer, pixel_values, DecodeOptions(max_new_tokens=8))


def lora_module_names(keys: list[str]) -> set[str]:
    """`q_proj` from `...self_attn.q_proj.lora_A.default.weight`."""
    return {k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in keys if ".lora_A." in k}


# The fixture is only useful if greedy decoding is not degenerate.


@pytest.mark.parametrize("text", DECODERS)
def test_tiny_models_emit_varied_greedy_tokens(make_checkpoint, text):
    checkpoint = load_checkpoint(make_checkpoint(text, text=text))
    tokens = greedy(checkpoint, pixels(checkpoint))
    assert len({tuple(t) for t in tokens}) >= 4, f"captions barely depend on the image: {tokens}"
    assert max(len(set(t)) for t in tokens) >= 3, f"captions repeat one token: {tokens}"


# Key namings.


@pytest.mark.parametrize("vision", VISION_ENCODERS)
def test_4x_and_5x_key_names_load_to_identical_outputs(make_checkpoint, vision):
    legacy_dir = make_checkpoint(f"{vision}-4x", vision=vision, legacy_keys=True)
    flat_dir = make_checkpoint(f"{vision}-5x", vision=vision, legacy_keys=False)
    legacy_keys, flat_keys = file_keys(legacy_dir), file_keys(flat_dir)
    legacy_marker = "vision_encoder.encoder.layer.0." if vision == "vit" else "vision_encoder.vision_model."
    assert any(k.startswith(legacy_marker) for k in legacy_keys)
    assert not any(k.startswith(legacy_marker) for k in flat_keys)
    assert set(legacy_keys) != set(flat_keys) and len(legacy_keys) == len(flat_keys)

    legacy, flat = load_checkpoint(legacy_dir), load_checkpoint(flat_dir)
    values = pixels(legacy)
    tokens = greedy(legacy, values)
    assert tokens == greedy(flat, values)
    with torch.no_grad():
        assert torch.equal(legacy.model.prefix_embeddings(torch.as_tensor(values)), flat.model.prefix_embeddings(torch.as_tensor(values)))
    assert torch.equal(teacher_forced_logits(legacy.model, values, tokens), teacher_forced_logits(flat.model, values, tokens))


def test_every_tensor_in_the_file_is_loaded_unchanged(make_checkpoint):
    checkpoint_dir = make_checkpoint("llama-5x", legacy_keys=False)
    state = load_checkpoint(checkpoint_dir).model.state_dict()
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            assert torch.equal(state[key], handle.get_tensor(key)), key


# Projections, decoders, vision encoders.


@pytest.mark.parametrize(
    ("projection", "expected_keys"),
    [
        ("linear", {"projection.projection.weight", "projection.projection.bias"}),
        ("mlp", {f"projection.projection.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}),
    ],
)
def test_linear_and_mlp_projections_load_with_distilvit_key_names(make_checkpoint, projection, expected_keys):
    checkpoint_dir = make_checkpoint(f"proj-{projection}", projection=projection)
    assert {k for k in file_keys(checkpoint_dir) if k.startswith("projection.")} == expected_keys
    checkpoint = load_checkpoint(checkpoint_dir)
    prefix = checkpoint.model.prefix_embeddings(torch.as_tensor(pixels(checkpoint, 2)))
    assert prefix.shape == (2, 16, 48)
    assert all(greedy(checkpoint, pixels(checkpoint, 2)))


@pytest.mark.parametrize("text", DECODERS)
def test_every_decoder_loads_with_its_default_lora_targets(make_checkpoint, text):
    checkpoint_dir = make_checkpoint(text, text=text)
    keys = file_keys(checkpoint_dir)
    assert all(k.startswith(("vision_encoder.", "projection.", "language_model.base_model.model.")) for k in keys)
    assert lora_module_names(keys) == DEFAULT_TARGETS[text]
    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint.model.has_lora
    assert checkpoint.model.causal_lm.config.model_type == text
    lora_b = [p for name, p in checkpoint.model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)


def test_llama_decoder_keeps_grouped_kv_heads(make_checkpoint):
    config = load_checkpoint(make_checkpoint("llama")).model.causal_lm.config
    assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize(("vision", "patches"), [("siglip_vision_model", 16), ("vit", 17), ("clip_vision_model", 17)])
def test_every_vision_encoder_loads_and_feeds_the_prefix(make_checkpoint, vision, patches):
    checkpoint = load_checkpoint(make_checkpoint(f"{vision}-4x", vision=vision, legacy_keys=True))
    assert checkpoint.model.vision_encoder.config.model_type == vision
    values = torch.as_tensor(pixels(checkpoint, 2))
    with torch.no_grad():
        assert checkpoint.model.vision_features(values).shape == (2, patches, 32)
        assert checkpoint.model.prefix_embeddings(values).shape == (2, patches, 48)
    assert all(greedy(checkpoint, pixels(checkpoint, 2)))


# Merged checkpoints and tied heads.


def test_already_merged_checkpoint_without_lora_keys_loads(make_checkpoint):
    merged_dir = make_checkpoint("llama-merged", merged=True)
    keys = file_keys(merged_dir)
    assert not any("lora_" in k or "base_layer" in k or k.startswith("language_model.base_model.") for k in keys)
    assert json.loads((merged_dir / "config.json").read_text())["lora_merged"] is True

    merged, lora = load_checkpoint(merged_dir), load_checkpoint(make_checkpoint("llama"))
    assert not merged.model.has_lora and merged.config.lora_merged
    values = pixels(merged)
    assert greedy(merged, values) == greedy(lora, values)


@pytest.mark.parametrize("text", DECODERS)
def test_tied_lm_head_absent_from_the_file_is_tied_after_loading(make_checkpoint, text):
    checkpoint_dir = make_checkpoint(text, text=text)
    assert not any(k.endswith("lm_head.weight") for k in file_keys(checkpoint_dir))
    lm = load_checkpoint(checkpoint_dir).model.causal_lm
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


# Preprocessing.


def noise_image(mode: str) -> Image.Image:
    rng = np.random.default_rng(7)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (45, 70, channels), dtype=np.uint8)  # not square, not the model size
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_derived_siglip_preprocessing_matches_transformers_pil_processor(tiny_checkpoint, mode):
    image = noise_image(mode)
    ours = load_checkpoint(tiny_checkpoint).preprocessor([image])
    reference = SiglipImageProcessorPil(size={"height": 32, "width": 32})(images=[image], return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_derived_vit_preprocessing_matches_transformers_pil_processor(make_checkpoint, mode):
    image = noise_image(mode)
    ours = load_checkpoint(make_checkpoint("vit-4x", vision="vit")).preprocessor([image])
    # ViT's processor leaves the channels alone by default (and then fails on grayscale); ours converts.
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, do_convert_rgb=True)
    reference = processor(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_derived_clip_preprocessing_matches_transformers_pil_processor_on_square_images(make_checkpoint):
    # CLIP's own processor resizes the shortest edge and centre-crops; on a square image that is a plain resize.
    image = noise_image("RGB").resize((50, 50))
    ours = load_checkpoint(make_checkpoint("clip_vision_model-4x", vision="clip_vision_model")).preprocessor([image])
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    np.testing.assert_allclose(ours, processor(images=[image], return_tensors="np")["pixel_values"], rtol=0, atol=1e-5)


def test_transparent_png_is_composited_on_white_like_transformers(tiny_checkpoint, tmp_path):
    path = tmp_path / "rgba.png"
    noise_image("RGBA").save(path)
    ours = load_checkpoint(tiny_checkpoint).preprocessor([open_image(path)])
    with Image.open(path) as image:
        reference = SiglipImageProcessorPil(size={"height": 32, "width": 32})(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_preprocessor_config_json_is_honoured(tiny_checkpoint, tmp_path):
    checkpoint_dir = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    settings = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "resample": int(Image.Resampling.BILINEAR),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.4, 0.3, 0.2],
        "image_std": [0.2, 0.25, 0.3],
    }
    (checkpoint_dir / PREPROCESSOR_NAME).write_text(json.dumps(settings))
    preprocessor = load_checkpoint(checkpoint_dir).preprocessor
    assert (preprocessor.image_mean, preprocessor.image_std, preprocessor.resample) == ([0.4, 0.3, 0.2], [0.2, 0.25, 0.3], 2)

    image = noise_image("RGB")
    reference = SiglipImageProcessorPil.from_pretrained(str(checkpoint_dir))(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocessor([image]), reference, rtol=0, atol=1e-5)
    derived = load_checkpoint(tiny_checkpoint).preprocessor([image])
    assert np.abs(derived - reference).max() > 0.1  # the file really changed something


def test_written_preprocessor_config_reproduces_the_derived_preprocessing_in_transformers(tiny_checkpoint, tmp_path):
    preprocessor = load_checkpoint(tiny_checkpoint).preprocessor
    (tmp_path / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor.to_json()))
    image = noise_image("RGBA")
    reference = SiglipImageProcessorPil.from_pretrained(str(tmp_path))(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocessor([image]), reference, rtol=0, atol=1e-5)


def test_loaded_tied_head_is_the_embedding_parameter(tiny_checkpoint) -> None:
    # Weights are assigned from the file, not copied into a randomly initialised model; the tie must survive.
    lm = load_checkpoint(tiny_checkpoint).model.causal_lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
