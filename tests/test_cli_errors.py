"""Bad input (DESIGN §7): exit code 2, one line on stderr naming the problem, no traceback,
nothing written. Most cases run in-process through `vlmexport.cli.main`; two run the real
console entry points in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmexport.checkpoint.caption import caption_images_torch
from vlmexport.cli import main
from vlmexport.samples import sample_images

Corruption = Callable[[Path], None]


def edit_config(change: Callable[[dict], None]) -> Corruption:
    def corrupt(checkpoint_dir: Path) -> None:
        path = checkpoint_dir / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    return corrupt


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Corruption:
    def corrupt(checkpoint_dir: Path) -> None:
        path = checkpoint_dir / "model.safetensors"
        state = load_file(str(path))
        change(state)
        save_file(state, str(path))

    return corrupt


def truncate(checkpoint_dir: Path) -> None:
    path = checkpoint_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(checkpoint_dir: Path) -> None:
    (checkpoint_dir / "model.safetensors").write_bytes(os.urandom(4096))


def to_pickle(checkpoint_dir: Path) -> None:
    path = checkpoint_dir / "model.safetensors"
    torch.save(load_file(str(path)), checkpoint_dir / "pytorch_model.bin")
    path.unlink()


MISSING_KEY = "projection.projection.bias"
EXTRA_KEY = "projection.extra_layer.weight"

# (id, corruption, words the one-line error must contain)
BAD_CHECKPOINTS: list[tuple[str, Corruption, list[str]]] = [
    ("missing-config", lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    ("config-not-json", lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    ("wrong-model-type", edit_config(lambda c: c.update(model_type="llama")), ["model_type 'llama'", "prefix_conditioning_vlm"]),
    ("truncated-safetensors", truncate, ["model.safetensors", "truncated or corrupt"]),
    ("corrupt-safetensors", garbage, ["model.safetensors", "truncated or corrupt"]),
    ("missing-weights", lambda d: (d / "model.safetensors").unlink(), ["model.safetensors", "missing"]),
    ("missing-key", edit_weights(lambda s: s.pop(MISSING_KEY)), ["1 missing key", MISSING_KEY]),
    ("unexpected-key", edit_weights(lambda s: s.update({EXTRA_KEY: torch.zeros(2)})), ["1 unexpected key", EXTRA_KEY]),
    ("wrong-shapes", edit_config(lambda c: c["text_config"].update(intermediate_size=80)), ["wrong shape", "mlp"]),
    ("projection-type-mismatch", edit_config(lambda c: c.update(projection_type="mlp")), ["projection.projection.0.weight"]),
    ("unsupported-vision", edit_config(lambda c: c["vision_config"].update(model_type="convnext")), ["unsupported vision encoder 'convnext'"]),
    ("unsupported-decoder", edit_config(lambda c: c["text_config"].update(model_type="t5")), ["unsupported decoder 't5'"]),
    ("pickle-only-weights", to_pickle, ["pytorch_model.bin", "pickle", "--allow-pickle"]),
    ("missing-tokenizer", lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json"]),
]


@pytest.fixture
def bad_copy(tiny_checkpoint, tmp_path) -> Callable[[Corruption], Path]:
    def make(corrupt: Corruption) -> Path:
        target = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
        corrupt(target)
        return target

    return make


def run(argv: list[str], capfd) -> tuple[int, str, str]:
    code = main(argv)
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, words: list[str]) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    assert " — " in lines[0], "the error should also say how to fix it"


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")], "temporary folder left behind"


@pytest.mark.parametrize(("corrupt", "words"), [pytest.param(c, w, id=i) for i, c, w in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_named_in_one_line_with_exit_2_and_nothing_written(bad_copy, tmp_path, capfd, corrupt, words):
    checkpoint_dir = bad_copy(corrupt)
    output = tmp_path / "out"
    code, _, err = run(["merge", "--model-dir", str(checkpoint_dir), "--output-dir", str(output)], capfd)
    assert_one_line_error(code, err, words)
    assert_nothing_written(output)


@pytest.mark.parametrize(("corrupt", "words"), [pytest.param(c, w, id=i) for i, c, w in BAD_CHECKPOINTS[:8]])
def test_caption_reports_a_bad_checkpoint_the_same_way(bad_copy, tmp_path, capfd, corrupt, words):
    image = tmp_path / "image.png"
    sample_images(1, 32)[0].save(image)
    code, out, err = run(["caption", "--model-dir", str(bad_copy(corrupt)), str(image)], capfd)
    assert_one_line_error(code, err, words)
    assert out == ""


def test_missing_model_folder_is_named_in_the_error(tmp_path, capfd):
    output = tmp_path / "out"
    code, _, err = run(["merge", "--model-dir", str(tmp_path / "nowhere"), "--output-dir", str(output)], capfd)
    assert_one_line_error(code, err, ["nowhere", "does not exist"])
    assert_nothing_written(output)


def test_missing_key_is_named_in_the_error(bad_copy, tmp_path, capfd):
    checkpoint_dir = bad_copy(edit_weights(lambda s: s.pop("vision_encoder.vision_model.post_layernorm.weight")))
    code, _, err = run(["merge", "--model-dir", str(checkpoint_dir), "--output-dir", str(tmp_path / "out")], capfd)
    # Named as the model calls it (the 4.x name in the file maps onto the 5.x name).
    assert_one_line_error(code, err, ["missing key", "vision_encoder.post_layernorm.weight"])


def test_many_missing_keys_are_counted_and_a_few_named(bad_copy, tmp_path, capfd):
    def drop_last_layer(state):
        for key in [k for k in state if k.startswith("language_model.base_model.model.model.layers.1.")]:
            del state[key]

    checkpoint_dir = bad_copy(edit_weights(drop_last_layer))
    code, _, err = run(["merge", "--model-dir", str(checkpoint_dir), "--output-dir", str(tmp_path / "o")], capfd)
    assert_one_line_error(code, err, ["17 missing key(s): language_model.base_model.model.model.layers.1.", "(+12 more)"])


def test_pickle_weights_are_accepted_with_allow_pickle(bad_copy, tiny_checkpoint, tmp_path, capfd):
    checkpoint_dir = bad_copy(to_pickle)
    output = tmp_path / "out"
    code, _, err = run(["merge", "--allow-pickle", "--model-dir", str(checkpoint_dir), "--output-dir", str(output)], capfd)
    assert code == 0, err
    assert (output / "model.safetensors").is_file()
    image = tmp_path / "image.png"
    sample_images(1, 32)[0].save(image)
    from_pickle = caption_images_torch(checkpoint_dir, [image], allow_pickle=True)
    assert from_pickle == caption_images_torch(tiny_checkpoint, [image]) == caption_images_torch(output, [image])


def test_non_image_passed_to_caption_is_named_and_the_model_is_not_loaded(tmp_path, capfd):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    # The model folder does not exist either: the image is checked first, so its error wins.
    code, out, err = run(["caption", "--model-dir", str(tmp_path / "nowhere"), str(text)], capfd)
    assert_one_line_error(code, err, ["notes.txt", "not a readable image"])
    assert out == ""


def test_missing_image_is_named(tiny_checkpoint, tmp_path, capfd):
    code, _, err = run(["caption", "--model-dir", str(tiny_checkpoint), str(tmp_path / "gone.png")], capfd)
    assert_one_line_error(code, err, ["gone.png", "does not exist"])


def test_a_folder_passed_as_an_image_points_at_folder_captioning(tiny_checkpoint, tmp_path, capfd):
    code, _, err = run(["caption", "--model-dir", str(tiny_checkpoint), str(tmp_path)], capfd)
    assert_one_line_error(code, err, ["is a folder", "--images DIR --output"])


def test_truncated_image_file_is_named(tiny_checkpoint, tmp_path, capfd):
    path = tmp_path / "cut.png"
    sample_images(1, 64)[0].save(path)
    path.write_bytes(path.read_bytes()[:100])
    code, _, err = run(["caption", "--model-dir", str(tiny_checkpoint), str(path)], capfd)
    assert_one_line_error(code, err, ["cut.png", "not a readable image"])


def test_non_empty_output_folder_is_refused_without_force(tiny_checkpoint, tmp_path, capfd):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    code, _, err = run(["merge", "--model-dir", str(tiny_checkpoint), "--output-dir", str(output)], capfd)
    assert_one_line_error(code, err, ["not empty", "--force"])
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_non_empty_output_folder_is_replaced_with_force(tiny_checkpoint, tmp_path, capfd):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    code, _, err = run(["merge", "--force", "--model-dir", str(tiny_checkpoint), "--output-dir", str(output)], capfd)
    assert code == 0, err
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_a_file_is_refused(tiny_checkpoint, tmp_path, capfd):
    output = tmp_path / "out"
    output.write_text("a file")
    code, _, err = run(["merge", "--model-dir", str(tiny_checkpoint), "--output-dir", str(output)], capfd)
    assert_one_line_error(code, err, ["is a file"])
    assert output.read_text() == "a file"


def test_synth_refuses_a_non_empty_output_folder(tmp_path, capfd):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    code, _, err = run(["synth", "--preset", "tiny", "--output-dir", str(output)], capfd)
    assert_one_line_error(code, err, ["not empty", "--force"])
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, capfd, position):
    args = ["merge", "--model-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")]
    argv = ["--debug", *args] if position == "before" else [*args, "--debug"]
    code, _, err = run(argv, capfd)
    assert code == 2
    assert "Traceback" in err and "CheckpointError" in err
    assert "error: model folder" in err


# The console entry points, end to end (slower: a fresh interpreter imports torch).


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"}


def test_python_dash_m_reports_a_missing_folder_in_one_line_with_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vlmexport", "merge", "--model-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_console_script_captions_one_line_per_image_even_when_piped(tiny_checkpoint, tmp_path):
    script = Path(sys.executable).parent / "vlmexport"
    if not script.is_file():
        pytest.skip("console script not installed")
    paths = []
    for i, image in enumerate(sample_images(2, 40, seed=2)):
        paths.append(tmp_path / f"a-rather-long-file-name-so-the-line-would-wrap-{i}.png")
        image.save(paths[-1])
    result = subprocess.run(
        [str(script), "caption", "--model-dir", str(tiny_checkpoint), *map(str, paths)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert all(line.split("\t")[1] for line in lines)
