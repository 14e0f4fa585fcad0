"""Other libraries load a bundle as it is: transformers.js the `transformers.js` layout, optimum
the distilvit layout's `language_model/`.

The shapes example is exported in the transformers.js layout with an int8 variant; Python
computes greedy and beam-search tokens with its own runtime, and web/test/transformers_js.test.mjs
loads the folder with the real @huggingface/transformers (AutoProcessor,
AutoModelForImageTextToText, generate) from local files and must give the same tokens. Node and
the npm packages come from web/install-deps.sh: missing, the Node test skips on a developer's
machine and fails under CI=true.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from serving import require
from transformers import AutoConfig, GenerationConfig

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import read_manifest, verify_files
from vlmexport.bundle.preprocess import bundle_preprocessor, open_image
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint, load_tokenizer
from vlmexport.cli import main
from vlmexport.exporter.export import export_bundle
from vlmexport.exporter.library_configs import IMAGE_TOKEN
from vlmexport.quantize import smooth
from vlmexport.quantize.quantize import quantize_bundle
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.caption import caption_tokens
from vlmexport.runtime.generate import greedy
from vlmexport.samples import sample_images

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
SHAPES = REPO / "examples" / "shapes"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# transformers.js' dtypes (its suffixes: src/utils/dtypes.js) → the vlmexport variant whose files
# each loads: q8, its default on WebAssembly, reads `_quantized`, the int8 graphs again (manifest.ALIASES).
DTYPES = {"fp32": "fp32", "int8": "int8", "q8": "int8"}


@pytest.fixture(scope="module")
def shapes() -> tuple[Path, list[Path]]:
    """(checkpoint, four held-out images): the trained shapes example, whose captions mean something."""
    return SHAPES / "model", sorted((SHAPES / "images").glob("*.png"))[:4]


@pytest.fixture(scope="module")
def folder(shapes: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes model in the transformers.js layout, fp32 and int8 (export verified; int8 unchecked here)."""
    out = tmp_path_factory.mktemp("tjs") / "shapes-captioner"
    export_bundle(shapes[0], out, layout="transformers.js")
    quantize_bundle(out, "int8", verify=False)
    return out


def test_the_folder_has_transformers_js_names_and_a_llava_config(folder: Path) -> None:
    manifest = read_manifest(folder)
    assert manifest.variants["fp32"] == {
        "vision_encoder": "onnx/vision_encoder.onnx",
        "embed_tokens": "onnx/embed_tokens.onnx",
        "decoder_model_merged": "onnx/decoder_model_merged.onnx",
    }
    graphs = ("vision_encoder", "embed_tokens", "decoder_model_merged")
    assert set(manifest.variants["int8"].values()) == {f"onnx/{n}_int8.onnx" for n in graphs}
    # transformers.js' q8 names: the same bytes, listed (and hash-checked) as int8's aliases.
    for name in graphs:
        alias, original = f"onnx/{name}_quantized.onnx", f"onnx/{name}_int8.onnx"
        assert manifest.files[alias]["alias_of"] == original and manifest.files[alias]["variant"] == "int8"
        assert (folder / alias).read_bytes() == (folder / original).read_bytes()
    # int8's embed_tokens: the table as 8-bit blocks like the decoder's tied table (not a float
    # copy), read with standard ops only: transformers.js' browser build has no GatherBlockQuantized.
    table = onnx.load(str(folder / "onnx/embed_tokens_int8.onnx")).graph
    assert {n.op_type for n in table.node} == {"Gather", "Cast", "Reshape", "Unsqueeze", "Sub", "Mul"}
    assert [i.data_type for i in table.initializer if len(i.dims) >= 2 and i.dims[0] == manifest.model["vocab_size"] + 1][0] == onnx.TensorProto.UINT8
    decoder = manifest.files["onnx/decoder_model_merged.onnx"]
    names = [i["name"] for i in decoder["inputs"]]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "num_logits_to_keep"] and names[4] == "past_key_values.0.key"
    assert [o["name"] for o in manifest.files["onnx/vision_encoder.onnx"]["outputs"]] == ["image_features"]
    config = json.loads((folder / "config.json").read_text())
    tokenizer = load_tokenizer(folder)
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == manifest.model["vocab_size"]
    processor = json.loads((folder / "processor_config.json").read_text())
    patches = (manifest.model["image_size"] // processor["patch_size"]) ** 2 + processor["num_additional_image_tokens"]
    assert patches == manifest.model["prefix_length"]
    assert json.loads((folder / "preprocessor_config.json").read_text())["processor_class"] == "LlavaProcessor"
    # Quantization migrates outliers at every norm and down_proj here as in the other layouts:
    # the Shape nodes this graph reads off its hidden states must not hide q/k/v (3 per layer).
    assert len(smooth.smoothable(onnx.load(str(folder / "onnx/decoder_model_merged.onnx")))) == 3 * manifest.model["num_layers"]


def test_q8_names_cover_every_component_when_only_some_are_quantized(folder: Path, tmp_path: Path) -> None:
    """transformers.js asks for `_quantized` for every session: a component `--components` left
    fp32 gets the name too, as a link to its fp32 graph; `--force` drops the replaced files."""
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    quantize_bundle(copy, "int8", components=["vision_encoder"], verify=False, force=True)
    manifest = read_manifest(copy)
    verify_files(copy, manifest)
    assert manifest.files["onnx/vision_encoder_quantized.onnx"]["alias_of"] == "onnx/vision_encoder_int8.onnx"
    for name in ("embed_tokens", "decoder_model_merged"):
        assert manifest.files[f"onnx/{name}_quantized.onnx"]["alias_of"] == f"onnx/{name}.onnx"
        assert (copy / f"onnx/{name}_quantized.onnx").read_bytes() == (copy / f"onnx/{name}.onnx").read_bytes()
        assert not (copy / f"onnx/{name}_int8.onnx").exists() and f"onnx/{name}_int8.onnx" not in manifest.files


def test_check_passes_the_transformers_js_layout_and_fails_a_scaled_decoder_weight(folder: Path, shapes, tmp_path: Path, capsys) -> None:
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    report = tmp_path / "report.json"
    assert main(["check", "--onnx-dir", str(copy), "--model-dir", str(shapes[0]), "--json", str(report)]) == 0
    components = {m["component"] for m in json.loads(report.read_text())["measurements"]}
    assert {"vision_encoder", "decoder_model_merged first pass", "decoder_model_merged step 1", "end_to_end"} <= components
    # The head's weight is the tied embedding: scaling it changes every logit the decoder makes.
    from test_check import scale_one_weight

    scale_one_weight(copy, "onnx/decoder_model_merged.onnx")
    assert main(["check", "--onnx-dir", str(copy), "--model-dir", str(shapes[0]), "--json", str(report)]) == 1
    failing = {m["component"] for m in json.loads(report.read_text())["measurements"] if not m["passed"]}
    assert "decoder_model_merged first pass" in failing and "vision_encoder" not in failing


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode()


def python_reference(folder: Path, images: list[Path]) -> dict:
    """What the Python runtime computes on the folder: tokens per variant, one image at a time."""
    pixels = bundle_preprocessor(folder)([open_image(p) for p in images])
    facts = read_manifest(folder).model
    tokens = {}
    for variant in sorted(set(DTYPES.values())):
        bundle = open_bundle(folder, variant, threads=1)
        # No repeated word (no_repeat_ngram_size 1): on the shapes model it is where beam search
        # and greedy part (4 of 4 images); with the defaults they agree on every image.
        tokens[variant] = {
            "greedy": caption_tokens(bundle, pixels, DecodeOptions(), batch_size=1),
            "greedy_norepeat": caption_tokens(bundle, pixels, DecodeOptions(no_repeat_ngram_size=1), batch_size=1),
            "beam3_norepeat": caption_tokens(bundle, pixels, DecodeOptions(num_beams=3, no_repeat_ngram_size=1), batch_size=1),
        }  # fmt: skip
    variants = [{"dtype": dtype, **tokens[variant]} for dtype, variant in DTYPES.items()]
    return {
        "bundle": str(folder),
        "images": [str(p) for p in images],
        "pixels": b64(pixels),
        "pixel_dims": list(pixels.shape),
        "prefix_length": facts["prefix_length"],
        "eos": facts["eos_token_id"],
        "variants": variants,
    }


def test_transformers_js_in_node_gives_python_tokens_greedy_and_beam_fp32_int8_q8(folder: Path, shapes, tmp_path: Path) -> None:
    require(shutil.which("node") is not None, "node")
    require((WEB / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file(), "web/node_modules (npm ci in web/)")
    fixture = python_reference(folder, shapes[1])
    # Captions that differ across images and between greedy and beam search prove the comparison can fail.
    for variant in fixture["variants"]:
        assert len({tuple(t) for t in variant["greedy"]}) > 1 and variant["beam3_norepeat"] != variant["greedy_norepeat"]
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps(fixture))
    done = subprocess.run(
        ["node", "--test", "--test-reporter=tap", "test/transformers_js.test.mjs"],
        capture_output=True, text=True, timeout=240, cwd=WEB, env={**os.environ, "VLM_TJS_FIXTURE": str(path)},
    )  # fmt: skip
    counts = {key: int(value) for key, value in re.findall(r"^# (pass|fail|skipped) (\d+)$", done.stdout, re.M)}
    assert done.returncode == 0 and counts.get("fail") == 0 and counts.get("pass") == len(DTYPES), done.stdout[-4000:] + done.stderr[-2000:]


def test_transformers_js_in_chromium_gives_python_tokens_greedy_and_beam_fp32_int8_q8(folder: Path, shapes, tmp_path: Path) -> None:
    """The browser build (onnxruntime-web, WebAssembly) through transformers.js' processor: the
    page resizes with the browser's canvas, not PIL; on the shapes images the tokens still agree."""
    require(shutil.which("node") is not None, "node")
    require(CHROMIUM.is_file(), f"Chromium ({CHROMIUM})")
    require((WEB / "node_modules" / "playwright-core" / "package.json").is_file(), "web/node_modules (npm ci in web/)")
    fixture = python_reference(folder, shapes[1])
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps(fixture))
    command = ["node", "test/transformers_js_browser.mjs", "--fixture", str(path), "--dtype", ",".join(DTYPES)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=WEB)
    assert done.returncode == 0, done.stderr[-4000:]
    page = json.loads(done.stdout.strip().splitlines()[-1])
    assert page["outside"] == [] and not [m for m in page["messages"] if m.startswith(("error", "pageerror"))], page
    for variant in fixture["variants"]:
        result = page["results"][variant["dtype"]]
        assert result["className"] == "LlavaForConditionalGeneration"
        assert result["greedy"] == variant["greedy"], (variant["dtype"], result)
        assert result["beam"] == variant["beam3_norepeat"], (variant["dtype"], result)


def test_distilvit_language_model_folder_carries_a_text_config_optimum_can_load(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """optimum's ORTModelForCausalLM reads config.json and generation_config.json from the
    subfolder it is given; bench/optimum_check.py loads the folder with optimum itself."""
    checkpoint = make_checkpoint("llama-siglip_vision_model-linear", text="llama")
    out = tmp_path / "onnx"
    export_bundle(checkpoint, out, verify=False)
    config = AutoConfig.from_pretrained(out / "language_model")
    root = json.loads((checkpoint / "config.json").read_text())["text_config"]
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (root["vocab_size"], root["num_hidden_layers"], root["hidden_size"])
    generation = GenerationConfig.from_pretrained(out / "language_model")
    assert generation.eos_token_id == load_tokenizer(out).eos_token_id and generation.do_sample is False
    manifest = read_manifest(out)
    assert {"language_model/config.json", "language_model/generation_config.json"} <= set(manifest.files)


@pytest.mark.parametrize(("text", "vision"), [("gpt2", "clip_vision_model"), ("opt", "vit")])
def test_gpt2_opt_decoders_and_vision_encoders_with_a_class_token_export_and_match_pytorch(make_checkpoint, tmp_path: Path, text: str, vision: str) -> None:
    ckpt = make_checkpoint(f"{text}-{vision}-linear", text=text, vision=vision)
    out = tmp_path / "tjs"
    export_bundle(ckpt, out, layout="transformers.js")  # verified: smoke parity against PyTorch
    checkpoint = load_checkpoint(ckpt)
    pixels = checkpoint.preprocessor(sample_images(3, 32))
    expected = generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, DecodeOptions(max_new_tokens=8))
    bundle = open_bundle(out)
    assert greedy(bundle, bundle.prefix(pixels), 8, checkpoint.tokenizer.eos_token_id, checkpoint.tokenizer.pad_token_id) == expected
    # CLIP and ViT prepend a class token: LlavaProcessor must expand "<image>" to one more token than patches.
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["num_additional_image_tokens"] == 1
