"""check: passes sound bundles (both layouts, Llama/GPT-2/OPT, batch 1 and 3), and is shown to
catch real faults — a weight scaled by 1.01 in any component, a projection from another
checkpoint, a decoder fed positions off by one (exit 1) — and broken files (exit 2).

Faults that change a file re-hash it in the manifest, so the parity check itself, not the
integrity check, has to catch them.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vlmexport.bundle.manifest import MANIFEST_NAME, read_manifest, variant_path, verify_files
from vlmexport.cli import main
from vlmexport.exporter.export import export_bundle
from vlmexport.runtime.bundle import Bundle
from vlmexport.samples import sample_images
from vlmexport.validate.check import check_bundle
from vlmexport.validate.metrics import Measurement
from vlmexport.validate.profiles import profile_named
from vlmexport.validate.report import CaptionResult, CheckReport, table_rows


@pytest.fixture(scope="session")
def pristine(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory: (checkpoint, exported bundle) per (layout, text, seed), built once; never modify them."""
    built: dict[tuple[str, str, int], tuple[Path, Path]] = {}

    def build(layout: str = "distilvit", text: str = "llama", seed: int = 0) -> tuple[Path, Path]:
        if (layout, text, seed) not in built:
            # The same checkpoint name and arguments as test_export's, so the session builds it once.
            ckpt = make_checkpoint(f"{text}-siglip_vision_model-linear", text=text, seed=seed)
            out = tmp_path_factory.mktemp(f"check-{layout}-{text}-{seed}") / "onnx"
            export_bundle(ckpt, out, layout=layout, verify=False)
            built[layout, text, seed] = (ckpt, out)
        return built[layout, text, seed]

    return build


@pytest.fixture
def bundle(pristine, tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: (checkpoint, a private copy of the bundle that the test may break)."""

    def copy(layout: str = "distilvit", text: str = "llama") -> tuple[Path, Path]:
        ckpt, source = pristine(layout, text)
        return ckpt, Path(shutil.copytree(source, tmp_path / f"{layout}-{text}"))

    return copy


def run_check(tmp_path: Path, capsys, bundle_dir: Path, *args: str) -> tuple[int, dict, str]:
    """`vlmexport check` in-process: (exit code, JSON report, stderr)."""
    report = tmp_path / "report.json"
    code = main(["check", "--onnx-dir", str(bundle_dir), "--json", str(report), *args])
    return code, json.loads(report.read_text()), capsys.readouterr().err


def failing_components(report: dict) -> set[str]:
    return {m["component"] for m in report["measurements"] if not m["passed"]}


def rehash(bundle_dir: Path, relative: str) -> None:
    """Record a changed file's new size and sha256 in the manifest (signature kept)."""
    manifest = read_manifest(bundle_dir)
    kept = {k: v for k, v in manifest.files[relative].items() if k not in ("size", "sha256")}
    manifest.describe_file(bundle_dir, relative, **kept)
    manifest.write(bundle_dir)


def scale_one_weight(bundle_dir: Path, relative: str, factor: float = 1.01) -> str:
    """Multiply one weight matrix — the median-sized one, not the embedding — by `factor`, and re-hash."""
    model = onnx.load(str(bundle_dir / relative))
    matrices = sorted((i for i in model.graph.initializer if len(i.dims) == 2), key=lambda i: (int(np.prod(i.dims)), i.name))
    weight = matrices[len(matrices) // 2]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    (bundle_dir / relative).unlink()  # a new file: the bundle may share (hard-link) it with another
    onnx.save(model, str(bundle_dir / relative))
    rehash(bundle_dir, relative)
    return weight.name


@pytest.mark.parametrize("layout", ["distilvit", "compact"])
@pytest.mark.parametrize("text", ["llama", "gpt2", "opt"])
def test_check_passes_a_sound_bundle_at_batch_1_and_3_and_records_the_verdict(bundle, tmp_path: Path, capsys, layout: str, text: str) -> None:
    ckpt, bundle_dir = bundle(layout, text)
    code, report, _ = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 0 and report["passed"] and report["schema_version"] == 2
    components = {m["component"] for m in report["measurements"]}
    steps = {c for c in components if " step " in c}
    assert {"vision_encoder", "projection", "end_to_end", "merge (pytorch)"} <= components and len(steps) >= 3
    assert {m["batch"] for m in report["measurements"] if m["component"] == "vision_encoder"} == {1, 3}
    assert len(report["captions"]) == 4 and all(c["match"] for c in report["captions"])
    assert len({tuple(c["reference_tokens"]) for c in report["captions"]}) > 1, "captions should vary, or matching them proves little"
    manifest = read_manifest(bundle_dir)
    assert manifest.checks["fp32"]["passed"] is True and manifest.checks["fp32"]["profile"] == "fp32"
    verify_files(bundle_dir, manifest)  # rewriting the manifest kept every listed hash valid
    assert MANIFEST_NAME not in manifest.files


@pytest.mark.parametrize(
    ("layout", "text", "relative", "culprit"),
    [
        ("distilvit", "llama", "vision_encoder/model.onnx", "vision_encoder"),
        ("distilvit", "llama", "projection.onnx", "projection"),
        ("distilvit", "llama", "prefix_init.onnx", "prefix_init"),
        ("distilvit", "gpt2", "language_model/model.onnx", "language_model step 1"),
        ("compact", "opt", "decoder/model.onnx", "decoder first pass"),
    ],
)
def test_check_fails_when_one_weight_is_scaled_by_1_01(bundle, tmp_path: Path, capsys, layout, text, relative, culprit) -> None:
    ckpt, bundle_dir = bundle(layout, text)
    scale_one_weight(bundle_dir, relative)
    code, report, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 1 and not report["passed"] and "error:" in err
    failing = failing_components(report)
    assert culprit in failing
    # Each graph is fed the reference's inputs, so the graphs upstream of the fault still pass.
    upstream = {"vision_encoder": set(), "projection": {"vision_encoder"}}.get(culprit, {"vision_encoder", "projection"})
    assert not failing & upstream
    assert read_manifest(bundle_dir).checks["fp32"]["passed"] is False


def test_check_fails_when_the_projection_comes_from_another_checkpoint(bundle, pristine, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = bundle("distilvit")
    _, other = pristine("distilvit", "llama", seed=1)
    shutil.copy(other / "projection.onnx", bundle_dir / "projection.onnx")
    rehash(bundle_dir, "projection.onnx")
    code, report, _ = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 1
    assert {"projection", "end_to_end"} <= failing_components(report) and "vision_encoder" not in failing_components(report)


@pytest.mark.parametrize(("layout", "text"), [("distilvit", "llama"), ("compact", "gpt2"), ("compact", "opt")])
def test_check_fails_when_the_decoder_is_fed_positions_off_by_one(bundle, tmp_path: Path, capsys, monkeypatch, layout, text) -> None:
    ckpt, bundle_dir = bundle(layout, text)
    real_step = Bundle.step

    def off_by_one(self, input_ids, past, position_offset=None):
        return real_step(self, input_ids, past, position_offset=past[0].shape[2] + 1)

    monkeypatch.setattr(Bundle, "step", off_by_one)  # the ONNX side only: the PyTorch reference is a TorchRunner
    code, report, _ = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 1
    failing = failing_components(report)
    assert any(" step " in c for c in failing)
    assert not failing & {"vision_encoder", "projection", "prefix_init", "decoder first pass"}


@pytest.mark.parametrize("relative", ["projection.onnx", "language_model/model.onnx", "tokenizer.json"])
def test_a_truncated_file_exits_2_naming_it(bundle, tmp_path: Path, capsys, relative: str) -> None:
    ckpt, bundle_dir = bundle("distilvit")
    data = (bundle_dir / relative).read_bytes()
    (bundle_dir / relative).write_bytes(data[: len(data) // 2])
    code, report, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 2 and relative in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert report["passed"] is False and report["error"]["exit_code"] == 2 and relative in report["error"]["problem"]


def test_a_missing_file_exits_2_naming_it(bundle, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = bundle("compact")
    (bundle_dir / "decoder" / "model.onnx").unlink()
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 2 and "decoder/model.onnx" in err and "missing" in err


def test_a_truncated_graph_with_a_matching_hash_still_exits_2(bundle, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = bundle("distilvit")
    data = (bundle_dir / "projection.onnx").read_bytes()
    (bundle_dir / "projection.onnx").write_bytes(data[: len(data) // 2])
    rehash(bundle_dir, "projection.onnx")
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 2 and "projection.onnx" in err


def test_a_graph_whose_signature_differs_from_the_manifest_exits_2(bundle, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = bundle("distilvit")
    path = bundle_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"]["projection.onnx"]["outputs"][0]["name"] = "prefix"
    path.write_text(json.dumps(data))
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt))
    assert code == 2 and "projection.onnx" in err and "outputs differ" in err


def _edited(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    replaced = edit(data)
    path.write_text(json.dumps(replaced if isinstance(replaced, list) else data))  # a list: the whole document replaced


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: [], "schema none"),
        (lambda d: d.update(files=None), "files is NoneType"),
        (lambda d: d["files"].pop("projection.onnx"), "which files does not list"),
        (lambda d: d["variants"]["fp32"].update(projection="../../etc/passwd"), "which files does not list"),
        (lambda d: d["files"].update({"../outside.onnx": {"size": 1, "sha256": "0"}}), "outside the bundle"),
        (lambda d: d["model"].update(num_layers="two"), "model.num_layers"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "caption"])
def test_a_damaged_manifest_is_one_line_with_exit_2_in_every_command(bundle, tmp_path: Path, capfd, edit, words: str, command: str) -> None:
    _, bundle_dir = bundle("distilvit")
    _edited(bundle_dir / MANIFEST_NAME, edit)
    image = _image(tmp_path)
    args = ["inspect", str(bundle_dir)] if command == "inspect" else ["caption", "--onnx-dir", str(bundle_dir), str(image)]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_a_manifest_whose_layers_are_not_the_graphs_is_named_before_any_run(bundle, tmp_path: Path, capfd) -> None:
    _, bundle_dir = bundle("distilvit")
    _edited(bundle_dir / MANIFEST_NAME, lambda d: d["model"].update(num_layers=d["model"]["num_layers"] + 1))
    assert main(["caption", "--onnx-dir", str(bundle_dir), str(_image(tmp_path))]) == 2
    err = capfd.readouterr().err
    assert "takes the past of" in err and "Traceback" not in err, err


@pytest.mark.parametrize(("variant", "words"), [("int4", "use one of fp32, int8"), ("int8", "vlmexport quantize --mode int8")])
def test_a_variant_the_bundle_lacks_is_named_with_a_fix_that_works(bundle, tmp_path: Path, capfd, variant: str, words: str) -> None:
    _, bundle_dir = bundle("distilvit")
    assert main(["caption", "--onnx-dir", str(bundle_dir), "--variant", variant, str(_image(tmp_path))]) == 2
    err = capfd.readouterr().err
    assert words in err and "--mode int4" not in err, err


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    sample_images(1)[0].save(path)
    return path


def add_variant(bundle_dir: Path, variant: str) -> None:
    """Register copies of the fp32 graphs as `variant`, as quantize registers its files."""
    manifest = read_manifest(bundle_dir)
    manifest.variants[variant] = {}
    for component, relative in manifest.variants["fp32"].items():
        target = variant_path(relative, variant)
        shutil.copy(bundle_dir / relative, bundle_dir / target)
        kept = {k: v for k, v in manifest.files[relative].items() if k not in ("size", "sha256")}
        manifest.describe_file(bundle_dir, target, **{**kept, "variant": variant})
        manifest.variants[variant][component] = target
    manifest.write(bundle_dir)


def test_without_a_checkpoint_a_variant_is_checked_against_the_bundles_fp32(bundle) -> None:
    _, bundle_dir = bundle("compact", "gpt2")
    add_variant(bundle_dir, "int8")
    report = check_bundle(bundle_dir, None, variant="int8", profile=profile_named("fp32"))
    assert report.passed and report.reference == "onnx fp32" and report.variant == "int8"
    # Identical graphs: only batch size changes the arithmetic (the reference runs all four images at once).
    assert max(m.value for m in report.measurements if m.metric == "rel_max") < 1e-5
    assert read_manifest(bundle_dir).checks["int8"]["passed"] is True
    scale_one_weight(bundle_dir, "projection_int8.onnx")
    failed = check_bundle(bundle_dir, None, variant="int8", profile=profile_named("fp32"))
    assert not failed.passed and {m.component for m in failed.failures} >= {"projection"}
    assert failed.parity_error() is not None and failed.parity_error().exit_code == 1
    assert read_manifest(bundle_dir).checks["int8"]["passed"] is False and "fp32" not in read_manifest(bundle_dir).checks


def test_images_from_a_folder_and_a_profile_file_are_used_and_images_repeat_to_fill_batch_3(bundle, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = bundle("distilvit")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(sample_images(2, 48, seed=7)):
        image.save(folder / f"{i:03d}.png")
    (folder / "captions.json").write_text("{}")  # not an image: ignored
    mine = tmp_path / "strict.toml"
    shutil.copy(profile_named("fp32").source, mine)
    code, report, _ = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt), "--images", str(folder), "--config", str(mine))
    assert code == 0 and report["images"] == ["000.png", "001.png"] and report["profile"]["name"] == "strict"
    assert {m["batch"] for m in report["measurements"] if m["component"] == "prefix_init"} == {1, 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "int4"], "unknown variant"),
        (["--variant", "int8"], "variant 'int8' is not in this bundle"),
        (["--profile", "fp32", "--config", "x.toml"], "both given"),
        (["--profile", "int3"], "unknown tolerance profile"),
        (["--max-new-tokens", "0"], "not positive"),
        (["--images", "/nonexistent-folder"], "not a folder"),
    ],
)
def test_bad_check_arguments_exit_2_with_one_line(pristine, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    ckpt, bundle_dir = pristine("distilvit")
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_folder_as_the_json_report_exits_2_before_checking(pristine, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt, bundle_dir = pristine("distilvit")
    monkeypatch.setattr("vlmexport.validate.check.check_bundle", lambda *a, **k: pytest.fail("checked before refusing --json"))
    code = main(["check", "--onnx-dir", str(bundle_dir), "--model-dir", str(ckpt), "--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and "report.json" in err and len(err.strip().splitlines()) == 1


def test_fp32_without_a_checkpoint_and_a_checkpoint_of_another_shape_exit_2(pristine, make_checkpoint, tmp_path: Path, capsys) -> None:
    _, bundle_dir = pristine("distilvit", "llama")
    code, _, err = run_check(tmp_path, capsys, bundle_dir)
    assert code == 2 and "--model-dir" in err
    other = make_checkpoint("gpt2-siglip_vision_model-linear", text="gpt2")
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(other))
    assert code == 2 and "another shape" in err and "kv_heads" in err


def test_an_unreadable_image_exits_2_naming_it(pristine, tmp_path: Path, capsys) -> None:
    ckpt, bundle_dir = pristine("distilvit")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    code, _, err = run_check(tmp_path, capsys, bundle_dir, "--model-dir", str(ckpt), "--images", str(folder))
    assert code == 2 and "broken.png" in err


def test_first_difference_names_the_first_differing_token_or_the_shorter_length() -> None:
    def first(ref: list[int], got: list[int]) -> int | None:
        return CaptionResult("x", ref, got, "", "").first_difference

    assert first([1, 2, 3], [1, 2, 3]) is None
    assert first([1, 2, 3], [1, 5, 3]) == 1
    assert first([1, 2, 3], [1, 2]) == 2
    assert first([], [4]) == 0


def test_report_json_is_strict_and_the_table_shows_the_worst_per_output() -> None:
    profile = profile_named("fp32")
    measurements = [
        Measurement("language_model step 1", "logits", "rel_max", 2e-4, 1e-3, batch=1),
        Measurement("language_model step 2", "logits", "rel_max", 5e-3, 1e-3, batch=3),
        Measurement("projection", "projected_prefix", "rel_max", math.inf, 1e-4, batch=1),
        Measurement("end_to_end", "teacher-forced", "top1", 1.0, 1.0, True, None, counted=0, positions=7, swing=0.5),
    ]
    report = CheckReport(Path("b"), "distilvit", "fp32", profile, "pytorch", ["a"], measurements, [])
    text = json.dumps(report.to_json(), allow_nan=False)  # non-finite values become null
    rows_json = json.loads(text)["measurements"]
    assert rows_json[2]["value"] is None and not report.passed
    assert "counted" not in rows_json[0]
    # Clear-margin top-1 says how many positions counted, also (especially) when none did.
    assert (rows_json[3]["counted"], rows_json[3]["positions"], rows_json[3]["swing"]) == (0, 7, 0.5)
    rows = table_rows(report)
    assert [(r.component, r.passed) for r in rows] == [("language_model steps", False), ("projection", False), ("end_to_end", True)]
    assert rows[0].value == 5e-3 and rows[0].where == "batch 3, step 2"
    assert rows[2].shown_value == "1 (0/7 counted)"
    assert report.parity_error().output.startswith("projection")  # an infinite error is the worst


def test_check_refuses_a_full_range_int8_graph_naming_the_node(bundle, monkeypatch, tmp_path: Path, capsys) -> None:
    """A variant that computes correctly on this machine but saturates on x86 without VNNI fails
    the check (exit 1) whichever machine runs it: the proof reads the stored weights."""
    from vlmexport.quantize import integer
    from vlmexport.quantize import quantize as stage
    from vlmexport.quantize.quantize import quantize_bundle

    _, bundle_dir = bundle("compact", "llama")

    def full_range(model, mode, component, per_channel, exclude, ranges, recipe, hessians=None):
        return integer.quantize_integer(model, mode, component, per_channel, exclude, reduce_range=False)

    monkeypatch.setattr(stage, "_quantize", full_range)
    quantize_bundle(bundle_dir, "int8", verify=False, recipe="dynamic")
    code, report, err = run_check(tmp_path, capsys, bundle_dir, "--variant", "int8")
    assert code == 1
    proofs = {p["file"]: p for p in report["portability"]}
    assert not proofs["decoder/model_int8.onnx"]["passed"] and proofs["decoder/model_int8.onnx"]["worst_int16_pair"] > 32767
    failing = [m for m in report["measurements"] if m["component"] == "portability" and not m["passed"]]
    assert failing and "MatMul" in failing[0]["output"]
    assert report["host"]["onnxruntime"] and "isa" in report["host"]
    assert read_manifest(bundle_dir).checks["int8"]["portable"] is False
    # The portable dynamic recipe (7-bit int8 weights) passes the same proof.
    monkeypatch.undo()
    quantize_bundle(bundle_dir, "int8", verify=False, recipe="dynamic", force=True)
    _, report, _ = run_check(tmp_path, capsys, bundle_dir, "--variant", "int8")
    assert report["portability"] and all(p["passed"] for p in report["portability"]), report["portability"]


def test_site_refuses_a_layout_its_page_cannot_run(bundle, tmp_path: Path, capfd) -> None:
    _, bundle_dir = bundle("transformers.js")
    assert main(["site", "--onnx-dir", str(bundle_dir), "--output-dir", str(tmp_path / "site")]) == 2
    err = capfd.readouterr().err
    assert "not transformers.js" in err and "--layout distilvit" in err and not (tmp_path / "site").exists(), err


def test_the_sites_layouts_are_the_ones_its_page_reads() -> None:
    import re

    from vlmexport.resources import web_dir
    from vlmexport.site.build import PAGE_LAYOUTS

    source = (web_dir() / "prefix_vlm.js").read_text()
    block = source[source.index("const LAYOUTS = {") : source.index("};", source.index("const LAYOUTS = {"))]
    assert tuple(re.findall(r"^\s+(\w+): \[", block, re.M)) == PAGE_LAYOUTS
