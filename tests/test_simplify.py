"""Shape folding (exporter/simplify.py) is sound beyond the sizes it samples: comparisons,
Min/Max and integer division of a size against a constant are folded only where the sign of a
size decides them for every size, and otherwise refused — checked at sizes past each threshold,
near max_position_embeddings, and end to end on a Mistral decoder whose sliding window is longer
than every sampled size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import VOCAB, WORDS, reinitialise, tiny_config_dict
from onnx import TensorProto, helper, numpy_helper

from vlmexport.checkpoint.config import parse_config
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.checkpoint.merge import merged_model
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.checkpoint.synth import random_model
from vlmexport.checkpoint.tokenizer import word_tokenizer
from vlmexport.exporter.export import export_bundle
from vlmexport.exporter.simplify import _learned, fold_shape_arithmetic
from vlmexport.runtime.bundle import open_bundle
from vlmexport.samples import sample_images
from vlmexport.validate.metrics import rel_max
from vlmexport.validate.reference import TorchRunner

THRESHOLD = 40  # above every size the folder samples (≤ 17), below max_position_embeddings
MAX_POSITIONS = 64
SIZES = (1, THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, MAX_POSITIONS - 1)


def _const(name: str, value: int | list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


# Each case: nodes computing `y` from x [batch_size, sequence_length, 4] and `s`, the sequence length.
CASES: dict[str, list[onnx.NodeProto]] = {
    # x · (s < 40): 1 at every sampled size, 0 from 40 on
    "less": [
        helper.make_node("Less", ["s", "threshold"], ["c"]),
        helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "cf"], ["y"]),
    ],
    # ±x by s >= 40
    "greater_or_equal": [
        helper.make_node("GreaterOrEqual", ["s", "threshold"], ["c"]),
        helper.make_node("Neg", ["x"], ["nx"]),
        helper.make_node("Where", ["c", "nx", "x"], ["y"]),
    ],
    # a sliding window's crop: the last 40 positions, x[:, max(s - 40, 0):] (start 0 at every sample)
    "max_window_crop": [
        helper.make_node("Sub", ["s", "threshold"], ["over"]),
        helper.make_node("Max", ["over", "zero"], ["start"]),
        helper.make_node("Unsqueeze", ["start", "axis0"], ["starts"]),
        helper.make_node("Slice", ["x", "starts", "big", "axis1"], ["y"]),
    ],
    # min(s, 40) rows, through a Reshape target: the window's length
    "min_window_length": [
        helper.make_node("Min", ["s", "threshold"], ["kept"]),
        helper.make_node("Sub", ["s", "kept"], ["dropped"]),
        helper.make_node("Unsqueeze", ["dropped", "axis0"], ["starts"]),
        helper.make_node("Slice", ["x", "starts", "big", "axis1"], ["y"]),
    ],
    # x + s // 40: 0 at every sample
    "integer_division": [
        helper.make_node("Div", ["s", "threshold"], ["q"]),
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "qf"], ["y"]),
    ],
    # x · (s != -1) and x · (s >= 0): a size is never -1, never negative — proven, folded
    "sign_decided": [
        helper.make_node("Equal", ["s", "minus_one"], ["c"]),
        helper.make_node("GreaterOrEqual", ["s", "zero"], ["d"]),
        helper.make_node("Xor", ["c", "d"], ["e"]),
        helper.make_node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "ef"], ["y"]),
    ],
}
REFUSED = {"less": "Less", "greater_or_equal": "GreaterOrEqual", "max_window_crop": "Max", "min_window_length": "Min", "integer_division": "Div"}


def _graph(case: str) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
        *CASES[case],
    ]
    inits = [
        _const("one", 1), _const("threshold", THRESHOLD), _const("zero", 0), _const("minus_one", -1),
        _const("axis0", [0]), _const("axis1", [1]), _const("big", [1 << 30]),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, case, [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_shape_arithmetic_equals_the_traced_at_sizes_past_every_threshold(case: str) -> None:
    model = _graph(case)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    fold_shape_arithmetic(folded)
    ops = {n.op_type for n in folded.graph.node}
    if case in REFUSED:
        assert REFUSED[case] in ops  # refused: still computed at run time
    else:
        assert ops.isdisjoint({"Shape", "Equal", "GreaterOrEqual"})  # proven by the sign of a size: folded
    for size in SIZES:
        x = np.random.default_rng(size).standard_normal((2, size, 4)).astype(np.float32)
        np.testing.assert_array_equal(_run(folded, x), _run(model, x), err_msg=f"{case} at sequence length {size}")


@pytest.mark.parametrize("expanded_is_an_output", [False, True])
def test_a_reshape_behind_positions_laid_out_by_range_folds_at_batch_1_too(expanded_is_an_output: bool) -> None:
    # GPT-2's and OPT's first pass: position ids = arange(length).unsqueeze(0).expand(1, -1),
    # embedded and added to x. Shape inference sizes neither that Range nor that Expand, so at
    # batch 1 the sum's batch axis was unknown (1 broadcast with unknown) and no reshape target
    # of any layer folded.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
        helper.make_node("Range", ["zero", "s", "one"], ["positions"]),
        helper.make_node("Unsqueeze", ["positions", "axis0"], ["row"]),
        # position_ids.expand(1, -1) as traced: the -1 replaced by a Where
        helper.make_node("Concat", ["axis1", "minus_one"], ["wanted"], axis=0),
        helper.make_node("Equal", ["wanted", "minus_one"], ["keep"]),
        helper.make_node("Shape", ["row"], ["row_shape"]),
        helper.make_node("Where", ["keep", "row_shape", "wanted"], ["expanded_shape"]),
        helper.make_node("Expand", ["row", "expanded_shape"], ["expanded"]),
        helper.make_node("Gather", ["table", "expanded"], ["embedded"]),
        helper.make_node("Add", ["x", "embedded"], ["summed"]),
        helper.make_node("Shape", ["summed"], ["summed_shape"]),
        helper.make_node("Slice", ["summed_shape", "zero_axis", "two", "zero_axis"], ["batch_and_length"]),
        helper.make_node("Concat", ["batch_and_length", "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["summed", "target"], ["y"]),
    ]
    inits = [
        _const("one", 1), _const("zero", 0), _const("axis0", [0]), _const("axis1", [1]), _const("minus_one", [-1]),
        _const("zero_axis", [0]), _const("two", [2]), _const("heads", [2, 2]), numpy_helper.from_array(np.arange(MAX_POSITIONS * 4, dtype=np.float32).reshape(MAX_POSITIONS, 4), "table"),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    outputs = [y, helper.make_tensor_value_info("expanded", TensorProto.INT64, None)] if expanded_is_an_output else [y]
    model = helper.make_model(helper.make_graph(nodes, "positions", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 18)])
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    fold_shape_arithmetic(folded)
    reshape = next(n for n in folded.graph.node if n.op_type == "Reshape")
    target = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name == reshape.input[1])
    assert target.tolist() == [0, 0, 2, 2]
    for batch, size in ((1, 1), (2, 7), (1, MAX_POSITIONS)):
        x_value = np.random.default_rng(size).standard_normal((batch, size, 4)).astype(np.float32)
        for got, want in zip(*(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x_value}) for m in (folded, model)), strict=True):
            np.testing.assert_array_equal(got, want)


def test_shapes_are_told_only_where_the_evaluator_agrees_with_the_graphs_types() -> None:
    evaluated = {"sized": np.zeros(3, np.int64), "other_type": np.zeros(3, np.int64), "new": np.zeros((2, 5), np.int64)}
    types = {"sized": TensorProto.INT64, "other_type": TensorProto.FLOAT, "new": TensorProto.INT64}
    told = _learned(evaluated, {"sized": (3,)}, types, told=set())
    assert [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in told] == [("new", [2, 5])]
    assert _learned(evaluated, {"sized": (3,)}, types, told={"new"}) == []


def _mistral_checkpoint(folder: Path) -> Path:
    config = tiny_config_dict(text="mistral")
    # The window (48) is longer than every size the folder samples and shorter than the positions tested.
    config["text_config"].update(sliding_window=48, max_position_embeddings=MAX_POSITIONS)
    model = random_model(parse_config(config), 0)
    reinitialise(model, 0)
    save_checkpoint(model.eval(), model.config, word_tokenizer(WORDS, vocab_size=VOCAB), None, folder)
    return folder


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mistral_checkpoint(tmp_path_factory.mktemp("mistral-window") / "ckpt")


@pytest.mark.parametrize(("layout", "opset"), [("compact", 18), ("distilvit", 23)])
def test_mistral_sliding_window_decodes_like_pytorch_up_to_max_position_embeddings(mistral: Path, tmp_path: Path, layout: str, opset: int) -> None:
    export_bundle(mistral, tmp_path / "onnx", layout=layout, opset=opset)
    bundle = open_bundle(tmp_path / "onnx")
    checkpoint = load_checkpoint(mistral)
    reference = TorchRunner(merged_model(checkpoint.model))
    prefix = reference.prefix(checkpoint.preprocessor(sample_images(1, 32)))
    (ref_logits, ref_past), (got_logits, got_past) = reference.first_pass(prefix), bundle.first_pass(prefix)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (1, MAX_POSITIONS - prefix.shape[1] - 1))
    worst = rel_max(ref_logits, got_logits)
    for column in range(tokens.shape[1]):  # through the window (48) to the last position (63)
        ref_logits, ref_past = reference.step(tokens[:, column : column + 1], ref_past)
        got_logits, got_past = bundle.step(tokens[:, column : column + 1], got_past)
        worst = max(worst, rel_max(ref_logits, got_logits))
    assert prefix.shape[1] + tokens.shape[1] == MAX_POSITIONS - 1
    assert worst < 1e-4, worst
