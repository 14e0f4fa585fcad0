"""The pieces of the quantization recipes, each against what it claims: outlier migration leaves
fp32 outputs unchanged, the switchable graph computes exactly either form, fp16's float32 islands
really stay float32, and `--keep-fp32 auto` keeps the costliest nodes until the target holds."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlmexport.bundle.manifest import read_manifest
from vlmexport.exporter.export import export_bundle
from vlmexport.quantize import fp16, sensitivity, smooth
from vlmexport.quantize.blockwise import BlockwiseRecipe, quantize_blockwise
from vlmexport.quantize.feeds import recorded_feeds
from vlmexport.quantize.quantize import quantize_bundle
from vlmexport.runtime.bundle import session
from vlmexport.validate.profiles import profile_named

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes"


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "onnx"
    export_bundle(SHAPES / "model", out, layout="compact")
    return out


@pytest.fixture
def bundle(shapes_bundle: Path, tmp_path: Path) -> Callable[[], Path]:
    return lambda: Path(shutil.copytree(shapes_bundle, tmp_path / "onnx"))


def _decoder(onnx_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_dir / read_manifest(onnx_dir).variants["fp32"]["decoder"]))


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], extra: dict | None = None) -> np.ndarray:
    runner = session(model.SerializeToString())
    names = {i.name for i in runner.get_inputs()}
    return runner.run(None, {**{k: v for k, v in feed.items() if k in names}, **(extra or {})})[0]


def test_smoothing_changes_no_fp32_output_and_shrinks_the_worst_outlier(shapes_bundle: Path) -> None:
    model = _decoder(shapes_bundle)
    feeds = recorded_feeds(shapes_bundle)["decoder"]
    items = smooth.smoothable(model)
    kinds = {("columns" if s.columns else "gamma") for s in items}
    assert len(items) == 2 * 3 and kinds == {"columns", "gamma"}  # per layer: q/k/v and gate/up after norms, down_proj
    peaks = smooth.activation_peaks(model, feeds, [s.activation for s in items])
    smoothed = copy.deepcopy(model)
    assert len(smooth.smooth(smoothed, peaks)) == len(items)
    for feed in feeds[:2]:
        before, after = _run(model, feed), _run(smoothed, feed)
        assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    after = smooth.activation_peaks(smoothed, feeds, list(peaks))
    ratio = max(float(p.max() / np.median(p)) for p in peaks.values())
    assert max(float(p.max() / np.median(p)) for p in after.values()) < ratio


def test_switchable_graph_computes_exactly_the_high_or_the_low_form(shapes_bundle: Path) -> None:
    model = _decoder(shapes_bundle)
    low, _ = quantize_blockwise(copy.deepcopy(model), BlockwiseRecipe(bits=4, symmetric=True), [])
    graph = sensitivity.switchable(copy.deepcopy(model), low)
    assert len(graph.nodes) == sum(n.op_type == "MatMul" for n in model.graph.node) + 1  # + the embedding Gather
    feed = recorded_feeds(shapes_bundle)["decoder"][0]
    off = np.zeros(len(graph.nodes), bool)
    assert np.array_equal(_run(graph.model, feed, {sensitivity.SWITCH_INPUT: off}), _run(model, feed))
    assert np.array_equal(_run(graph.model, feed, {sensitivity.SWITCH_INPUT: ~off}), _run(low, feed))


def test_keep_fp32_auto_keeps_the_costliest_nodes_until_the_target_holds(bundle, monkeypatch) -> None:
    onnx_dir = bundle()
    # A decoder KL target (1e-4 nats) the all-quantized q4 decoder misses, so nodes must be kept;
    # keeping every node float32 meets it (smoothing is exact up to float rounding).
    target = 1e-4
    monkeypatch.setattr("vlmexport.quantize.quantize.AUTO_KL_SHARE", target / profile_named("q4").end_to_end.goal_kl)
    report = quantize_bundle(onnx_dir, "q4", verify=False, keep_fp32="auto")
    choice = report.keep_fp32
    assert choice.all_low.kl > target, "the target must need kept nodes for this test to mean anything"
    assert choice.met and 0 < len(choice.kept) < len(choice.ranking)
    assert choice.kept == [c.node for c in choice.ranking[: len(choice.kept)]]  # the costliest first
    assert choice.ranking == sorted(choice.ranking, key=lambda c: -c.kl)
    assert choice.fidelity.kl <= target < choice.all_low.kl and 0 < choice.quantized_share < 1
    graph = onnx.load(str(onnx_dir / "decoder/model_q4.onnx")).graph
    float_nodes = {n.name for n in graph.node if n.op_type in ("MatMul", "Gather")}
    assert set(choice.kept) <= float_nodes
    assert any("--keep-fp32 auto" in note and "quantized" in note for note in report.notes)


def test_keep_fp32_auto_is_refused_for_fp16(bundle, capsys) -> None:
    from vlmexport.cli import main

    assert main(["quantize", "--onnx-dir", str(bundle()), "--mode", "fp16", "--keep-fp32", "auto"]) == 2
    assert "drop --keep-fp32 for fp16" in capsys.readouterr().err


def test_fp16_kept_nodes_exchange_float32_directly(shapes_bundle: Path) -> None:
    model = _decoder(shapes_bundle)
    kept = {n.name for n in model.graph.node if n.op_type in ("Pow", "ReduceMean", "Add", "Sqrt", "Div")}
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True, node_block_list=sorted(kept))
    producers = {o: n for n in converted.graph.node for o in n.output}

    def to(node: onnx.NodeProto) -> int:
        return next(a.i for a in node.attribute if a.name == "to")

    def round_trips(graph: onnx.GraphProto) -> int:
        """float32 → float16 → float32 between two kept nodes."""
        count = 0
        for node in graph.node:
            up = producers.get(node.input[0]) if node.op_type == "Cast" and to(node) == onnx.TensorProto.FLOAT else None
            if up is not None and up.op_type == "Cast" and to(up) == onnx.TensorProto.FLOAT16:
                count += producers.get(up.input[0]) is not None and producers[up.input[0]].name in kept
        return count

    assert round_trips(converted.graph) > 0  # what the converter does on its own
    joined = fp16.float32_islands(converted, kept)
    producers = {o: n for n in converted.graph.node for o in n.output}
    assert joined > 0 and round_trips(converted.graph) == 0
    feed = recorded_feeds(shapes_bundle)["decoder"][0]
    assert np.isfinite(_run(converted, feed)).all()


def test_hqq_recipe_optimises_q4_decoder_blocks_and_keeps_the_head_8_bit(bundle) -> None:
    onnx_dir = bundle()
    report = quantize_bundle(onnx_dir, "q4", verify=False, recipe="hqq")
    graph = onnx.load(str(onnx_dir / "decoder/model_q4.onnx")).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits["/lm_head/MatMul_Q8"] == 8 and {b for name, b in bits.items() if "lm_head" not in name} == {4}
    zero_points = [n.input[3] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert len(zero_points) == len(bits) - 1  # HQQ's per-block zero points; the 8-bit head is symmetric
    decoder = next(r for r in report.rows if r.component == "decoder")
    assert "HQQ" in decoder.settings["weights"] and "smoothing" not in decoder.settings


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_high_bit_nodes_take_their_own_block_size(shapes_bundle: Path, rounding: str) -> None:
    model = _decoder(shapes_bundle)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in model.graph.initializer}]
    # GPTQ rounds a MatMul it has a Hessian for; an identity one keeps this about block sizes.
    widths = {i.name: i.dims[0] for i in model.graph.initializer if len(i.dims) == 2}
    hessians = {n.input[0]: np.eye(widths[n.input[1]]) for n in matmuls} if rounding == "gptq" else None
    recipe = BlockwiseRecipe(bits=4, symmetric=False, block_size=16, high_bits=("*down_proj*",), high_block_size=32, algorithm=rounding, smooth_alpha=None)
    quantized, record = quantize_blockwise(model, recipe, [], hessians=hessians)
    blocks = {
        n.name: ({a.name: a.i for a in n.attribute}["bits"], {a.name: a.i for a in n.attribute}["block_size"])
        for n in quantized.graph.node
        if n.op_type == "MatMulNBits"
    }
    down = {name: b for name, b in blocks.items() if "down_proj" in name}
    assert down and set(down.values()) == {(8, 32)}
    assert {b for name, b in blocks.items() if "down_proj" not in name} == {(4, 16)}
    assert "8-bit in blocks of 32: *down_proj*" in record["weights"]
    if rounding == "gptq":  # both groups rounded by GPTQ (the tied head is always rounded to nearest)
        assert f"GPTQ's codes for {sum('lm_head' not in name for name in blocks)} nodes" in record["method"]
