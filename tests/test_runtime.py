"""The ONNX captioner: greedy, beam search and sampling over any Runner give transformers'
tokens; `caption --onnx-dir` and its errors."""
# ruff: noqa: F811 — `export_tiny` is test_export's session fixture, imported to share its bundles

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import export_tiny  # noqa: F401
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlmexport.bundle.decoding import DecodeOptions, options_from_flags
from vlmexport.bundle.preprocess import open_image
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.cli import main
from vlmexport.errors import UsageError
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.caption import caption_images, caption_tokens
from vlmexport.runtime.generate import generate, greedy
from vlmexport.samples import sample_images
from vlmexport.validate.reference import TorchRunner

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes"
BEAM_OPTIONS = [
    DecodeOptions(max_new_tokens=8, num_beams=3),
    DecodeOptions(max_new_tokens=12, num_beams=4, length_penalty=0.0, early_stopping=True, no_repeat_ngram_size=2),
    DecodeOptions(max_new_tokens=10, num_beams=2, length_penalty=2.0, early_stopping="never"),
    DecodeOptions(max_new_tokens=10, num_beams=3, length_penalty=-1.0, no_repeat_ngram_size=1),
]


def _setup(export_tiny, make_checkpoint, layout: str = "compact", text: str = "llama", images: int = 4):
    checkpoint = load_checkpoint(make_checkpoint(f"{text}-siglip_vision_model-linear", text=text))
    bundle = open_bundle(export_tiny(layout, text))
    return checkpoint, bundle, checkpoint.preprocessor(sample_images(images, 32))


def _ids(checkpoint) -> tuple[int, int]:
    return checkpoint.tokenizer.eos_token_id, checkpoint.tokenizer.pad_token_id


@pytest.mark.parametrize("layout", ["distilvit", "compact"])
@pytest.mark.parametrize("text", ["llama", "gpt2", "opt"])
def test_beam_search_on_the_bundle_gives_transformers_tokens(export_tiny, make_checkpoint, layout: str, text: str) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint, layout, text)
    prefix = bundle.prefix(pixels)
    for options in BEAM_OPTIONS[:2] if layout == "distilvit" else BEAM_OPTIONS:
        expected = generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options)
        assert generate(bundle, prefix, options, *_ids(checkpoint)) == expected, options
    # Beam search must differ from greedy somewhere, or the comparison proves little.
    assert expected != generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, DecodeOptions(max_new_tokens=options.max_new_tokens))


def test_beam_search_over_the_torch_runner_gives_transformers_tokens(make_checkpoint) -> None:
    checkpoint = load_checkpoint(make_checkpoint("llama-siglip_vision_model-linear"))
    pixels = checkpoint.preprocessor(sample_images(3, 32))
    runner = TorchRunner(checkpoint.model)
    options = DecodeOptions(max_new_tokens=8, num_beams=3, early_stopping=True)
    assert generate(runner, runner.prefix(pixels), options, *_ids(checkpoint)) == generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_greedy_with_no_repeat_ngram_gives_transformers_tokens(export_tiny, make_checkpoint, size: int) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint)
    options = DecodeOptions(max_new_tokens=16, no_repeat_ngram_size=size)
    got = generate(bundle, bundle.prefix(pixels), options, *_ids(checkpoint))
    assert got == generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options)
    plain = greedy(bundle, bundle.prefix(pixels), 16, *_ids(checkpoint))
    assert got != plain, "tiny models repeat tokens greedily; the n-gram ban must change something"


def test_batched_captions_equal_one_image_at_a_time(export_tiny, make_checkpoint) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint, images=5)
    for options in (DecodeOptions(max_new_tokens=8), DecodeOptions(max_new_tokens=8, num_beams=3)):
        batched = caption_tokens(bundle, pixels, options, batch_size=5)
        assert batched == [caption_tokens(bundle, pixels[i : i + 1], options)[0] for i in range(5)]
        assert batched == caption_tokens(bundle, pixels, options, batch_size=2)


def test_default_length_is_the_bundle_max_length_and_eos_stops_early(export_tiny, make_checkpoint) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint, images=6)
    tokens = caption_tokens(bundle, pixels, DecodeOptions())
    assert tokens == generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, DecodeOptions())
    assert max(map(len, tokens)) == bundle.manifest.model["max_length"] == 8
    forced = generate(bundle, bundle.prefix(pixels), DecodeOptions(max_new_tokens=12), None, None)
    assert all(len(t) == 12 for t in forced), "eos=None must force exactly max_new_tokens"
    # Random tiny models rarely say EOS: make a token row 0 emits the EOS, so rows end at different steps.
    eos = forced[0][3]
    stopped = generate(bundle, bundle.prefix(pixels), DecodeOptions(max_new_tokens=12), eos, 1)
    assert stopped == [t[: t.index(eos)] if eos in t else t for t in forced]
    assert len({len(t) for t in stopped}) > 1


def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(export_tiny, make_checkpoint) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint)
    prefix = bundle.prefix(pixels)

    def run(seed: int, **kwargs) -> list[list[int]]:
        return generate(bundle, prefix, DecodeOptions(max_new_tokens=8, do_sample=True, seed=seed, **kwargs), *_ids(checkpoint))

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(5, num_beams=3, top_k=10) == run(5, num_beams=3, top_k=10)  # beam sampling too


def _chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile at p = 0.001 (z = 3.09)."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def _first_token_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """PyTorch's probabilities for the first sampled token: transformers' own warpers, then softmax."""
    scores = torch.as_tensor(logits)
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return torch.softmax(scores, -1).numpy().astype(np.float64)[0]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 12, 0.9), (1.5, 0, 1.0), (1.0, 6, 1.0)])
def test_sampled_first_tokens_follow_pytorch_probabilities(export_tiny, make_checkpoint, temperature: float, top_k: int, top_p: float) -> None:
    checkpoint, bundle, pixels = _setup(export_tiny, make_checkpoint, images=1)
    draws = 6000
    runner = TorchRunner(checkpoint.model)
    logits = runner.first_pass(runner.prefix(pixels))[0][:, -1]
    expected = _first_token_probabilities(logits, temperature, top_k or logits.shape[-1], top_p)
    options = DecodeOptions(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    prefix = np.repeat(bundle.prefix(pixels), draws, axis=0)
    tokens = [t[0] for t in generate(bundle, prefix, options, None, None)]
    counts = np.bincount(tokens, minlength=expected.size)
    assert not counts[expected == 0].any(), "a token top-k/top-p removed was drawn"
    support = expected > 0
    assert support.sum() >= 4, "the distribution should have several tokens to test against"
    chi2 = ((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])).sum()
    assert chi2 < _chi_square_critical(int(support.sum()) - 1)
    assert 0.5 * np.abs(counts / draws - expected).sum() < 0.04  # total variation
    # The test can fail: the same draws against the untempered distribution are rejected.
    wrong = _first_token_probabilities(logits, 1.0 if temperature != 1.0 else 0.5, logits.shape[-1], 1.0)
    chi2_wrong = ((counts - draws * wrong) ** 2 / (draws * wrong)).sum()
    assert chi2_wrong > 10 * _chi_square_critical(logits.shape[-1] - 1)


def test_options_reject_bad_values_and_flag_combinations() -> None:
    with pytest.raises(UsageError, match="temperature"):
        options_from_flags(temperature=0.5)
    with pytest.raises(UsageError, match="--length-penalty applies only to beam search"):
        options_from_flags(length_penalty=2.0)
    with pytest.raises(UsageError, match="early-stopping"):
        options_from_flags(num_beams=2, early_stopping="sometimes")
    with pytest.raises(UsageError, match="top_p"):
        DecodeOptions(do_sample=True, top_p=1.5)
    with pytest.raises(UsageError, match="num_beams"):
        DecodeOptions(num_beams=0)
    assert options_from_flags(num_beams=3, early_stopping="never").early_stopping == "never"
    assert options_from_flags(do_sample=True, top_k=5, seed=1) == DecodeOptions(do_sample=True, top_k=5, seed=1)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(sample_images(3, 32, seed=3)):
        image.save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


@pytest.mark.parametrize("layout", ["distilvit", "compact"])
def test_caption_command_on_a_bundle_prints_what_the_torch_backend_prints(export_tiny, make_checkpoint, image_files, layout, capsys) -> None:
    checkpoint_dir = make_checkpoint("llama-siglip_vision_model-linear")
    flags = ["--num-beams", "3", "--no-repeat-ngram-size", "2", "--max-new-tokens", "6", "--json"]
    assert main(["caption", "--onnx-dir", str(export_tiny(layout)), *map(str, image_files), *flags]) == 0
    onnx = json.loads(capsys.readouterr().out)
    assert main(["caption", "--model-dir", str(checkpoint_dir), *map(str, image_files), *flags]) == 0
    assert onnx == json.loads(capsys.readouterr().out)
    assert [row["image"] for row in onnx] == list(map(str, image_files)) and all(row["caption"] for row in onnx)


def test_caption_command_samples_reproducibly(export_tiny, image_files, capsys) -> None:
    args = ["caption", "--onnx-dir", str(export_tiny("compact")), *map(str, image_files), "--do-sample", "--top-k", "20", "--temperature", "0.8", "--seed", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "0.5"], "--temperature applies only to sampling"),
        (["--do-sample", "--top-p", "0"], "top_p"),
        (["--length-penalty", "2"], "only to beam search"),
        (["--variant", "int8"], "variant 'int8' is not in this bundle"),
        (["--model-dir", "ckpt"], "two different backends"),
        (["--backend", "torch"], "--backend torch needs --model-dir"),
        (["--backend", "tflite"], "unknown backend"),
        (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    ],
)
def test_bad_caption_options_exit_2_with_one_line(export_tiny, image_files, capsys, extra, message) -> None:
    code = main(["caption", "--onnx-dir", str(export_tiny("compact")), str(image_files[0]), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_image_exits_2_before_the_bundle_loads(tmp_path, capsys) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["caption", "--onnx-dir", str(tmp_path / "no-bundle"), str(text)]) == 2
    err = capsys.readouterr().err
    assert "notes.png is not a readable image" in err and len(err.strip().splitlines()) == 1


def test_caption_images_uses_the_bundle_preprocessor_config(export_tiny, image_files, tmp_path) -> None:
    bundle = shutil.copytree(export_tiny("compact"), tmp_path / "b")
    before = caption_images(bundle, image_files)
    config = json.loads((bundle / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.0, 0.0, 0.0]  # a different normalisation must change what the model sees
    (bundle / "preprocessor_config.json").write_text(json.dumps(config))
    assert caption_images(bundle, image_files) != before


def test_shapes_example_bundle_greedy_and_beam_captions_equal_pytorch(tmp_path_factory) -> None:
    from vlmexport.exporter.export import export_bundle

    out = tmp_path_factory.mktemp("shapes") / "onnx"
    export_bundle(SHAPES / "model", out, layout="compact")
    checkpoint = load_checkpoint(SHAPES / "model")
    paths = sorted((SHAPES / "images").glob("*.png"))[:8]
    pixels = checkpoint.preprocessor([open_image(p) for p in paths])
    bundle = open_bundle(out)
    for options in (DecodeOptions(), DecodeOptions(num_beams=3), DecodeOptions(num_beams=4, length_penalty=0.5, no_repeat_ngram_size=3)):
        assert caption_tokens(bundle, pixels, options) == generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options), options
