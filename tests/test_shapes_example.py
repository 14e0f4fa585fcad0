"""The bundled example checkpoint (examples/shapes/) captions its held-out images, and its
LoRA adapters are what make it do so; its training script runs and writes a loadable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import PREPROCESSOR_NAME, open_image
from vlmexport.bundle.tokenizer import decode
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes"
MODEL_DIR = EXAMPLE / "model"
IMAGES_DIR = EXAMPLE / "images"


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_checkpoint(MODEL_DIR)


@pytest.fixture(scope="module")
def truth() -> dict[str, str]:
    return json.loads((IMAGES_DIR / "captions.json").read_text())


def greedy_captions(checkpoint: Checkpoint, names: list[str], images_dir: Path = IMAGES_DIR) -> list[str]:
    pixels = checkpoint.preprocessor([open_image(images_dir / name) for name in names])
    options = DecodeOptions(max_new_tokens=checkpoint.config.max_length)
    return decode(checkpoint.tokenizer, generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options))


def test_heldout_images_are_many_and_pngs(truth: dict[str, str]) -> None:
    assert len(truth) >= 24
    for name in truth:
        assert (IMAGES_DIR / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_captions_heldout_images_correctly(checkpoint: Checkpoint, truth: dict[str, str]) -> None:
    captions = greedy_captions(checkpoint, list(truth))
    correct = sum(c == t for c, t in zip(captions, truth.values(), strict=True))
    assert correct / len(truth) >= 0.9, list(zip(captions, truth.values(), strict=True))


def test_disabling_lora_changes_most_captions(checkpoint: Checkpoint, truth: dict[str, str]) -> None:
    names = list(truth)
    with_lora = greedy_captions(checkpoint, names)
    with checkpoint.model.language_model.disable_adapter():
        without_lora = greedy_captions(checkpoint, names)
    changed = sum(a != b for a, b in zip(with_lora, without_lora, strict=True))
    assert changed / len(names) >= 0.5


def test_example_is_stored_like_a_real_distilvit_checkpoint(checkpoint: Checkpoint) -> None:
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    # transformers-4.x names, a PEFT-wrapped decoder with adapters, no preprocessor file.
    assert any(k.startswith("vision_encoder.vision_model.") for k in keys)
    assert any(".lora_A.default.weight" in k for k in keys)
    assert any(".base_layer.weight" in k for k in keys)
    assert not (MODEL_DIR / PREPROCESSOR_NAME).exists()
    assert checkpoint.model.has_lora
    text = checkpoint.config.text_config
    assert text["num_key_value_heads"] < text["num_attention_heads"] and text["tie_word_embeddings"]


def test_example_lora_adapters_are_trained(checkpoint: Checkpoint) -> None:
    # PEFT starts lora_B at zero; a trained adapter has moved it.
    lora_b = [p for n, p in checkpoint.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)


def test_example_checkpoint_is_small() -> None:
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 5_000_000


def test_train_script_smoke_run_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out, images = tmp_path / "model", tmp_path / "images"
    command = [
        sys.executable,
        str(EXAMPLE / "train.py"),
        "--steps", "3",
        "--heldout", "4",
        "--output-dir", str(out),
        "--images-dir", str(images),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out accuracy" in result.stdout
    smoke = load_checkpoint(out)
    assert smoke.model.has_lora
    truth = json.loads((images / "captions.json").read_text())
    assert len(truth) == 4
    assert len(greedy_captions(smoke, list(truth), images)) == 4
