"""attention_layout: the traced 4-D attention rewritten to 3-D `Attention` with the cache as
its input and output computes bit for bit what the traced graph does in onnxruntime, and what
it cannot prove stays as traced."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmexport.exporter.attention_layout import _topological, fold_attention_layout

HEADS, KV_HEADS, DIM = 4, 2, 8


def _traced(rotary: bool, past: bool, extra_reader: str | None = None, perm: list[int] | None = None) -> onnx.ModelProto:
    """A decoder layer's attention as the opset-23 export traces it: q/k/v [B, S, H·D] reshaped
    to [B, S, H, D], transposed to [B, H, S, D] (q and k rotated), k/v appended to the cache,
    Attention, then transposed and reshaped back."""
    perm = perm or [0, 2, 1, 3]
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("Reshape", [name, f"{name}_target"], [f"{name}_4d"]),
            helper.make_node("Transpose", [f"{name}_4d"], [f"{name}_t"], perm=perm),
        ]
        if rotary and name != "v":
            nodes.append(helper.make_node("RotaryEmbedding", [f"{name}_t", "cos", "sin"], [f"{name}_r"]))
    q, k, v = ("q_r", "k_r", "v_t") if rotary else ("q_t", "k_t", "v_t")
    if past:
        nodes += [
            helper.make_node("Concat", ["past_key", k], ["present_key"], axis=-2),
            helper.make_node("Concat", ["past_value", v], ["present_value"], axis=-2),
        ]
        k, v = "present_key", "present_value"
    nodes += [
        helper.make_node("Attention", [q, k, v, "mask"], ["y4"], scale=0.3),
        helper.make_node("Transpose", ["y4"], ["y_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y_t", "y_target"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "length", HEADS * DIM])]
    if past:
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", KV_HEADS, "total", DIM]) for n in ("present_key", "present_value")]
    if extra_reader:  # a tensor the fused form would no longer have
        nodes.append(helper.make_node("Shape", [extra_reader], ["extra_shape"]))
        outputs.append(helper.make_tensor_value_info("extra_shape", TensorProto.INT64, [4]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "length", h * DIM]) for n, h in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "length", "total"]))
    if rotary:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "length", DIM // 2]) for n in ("cos", "sin")]
    if past:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", KV_HEADS, "past", DIM]) for n in ("past_key", "past_value")]
    targets = [numpy_helper.from_array(np.array(t, np.int64), n) for n, t in (("q_target", [0, 0, -1, DIM]), ("k_target", [0, 0, -1, DIM]), ("v_target", [0, 0, KV_HEADS, DIM]), ("y_target", [0, 0, -1]))]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, targets)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _feeds(model: onnx.ModelProto, batch: int, length: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "length": length, "past": past, "total": past + length}
    feeds = {}
    for value in model.graph.input:
        shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    allowed = np.tril(np.ones((length, past + length), bool), k=past)
    allowed = np.broadcast_to(allowed, (batch, 1, length, past + length)).copy()
    allowed[0, :, :, :2] = False  # the first sequence's first two positions are padding
    feeds["mask"] = np.where(allowed, 0.0, -np.inf).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize(("rotary", "past"), [(True, True), (False, False), (True, False), (False, True)])
def test_rewritten_attention_computes_what_the_traced_graph_does(rotary: bool, past: bool) -> None:
    traced = _traced(rotary, past)
    fused = onnx.ModelProto()
    fused.CopyFrom(traced)
    assert fold_attention_layout(fused) == 1
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert ops == [*(["RotaryEmbedding"] * 2 if rotary else []), "Attention"]
    attention = fused.graph.node[-1]
    assert {a.name: helper.get_attribute_value(a) for a in attention.attribute} == {"q_num_heads": HEADS, "kv_num_heads": KV_HEADS, "scale": pytest.approx(0.3)}
    assert [o.name for o in fused.graph.output] == [o.name for o in traced.graph.output]
    for batch, length, past_length in ((2, 5, 3), (1, 1, 9), (3, 4, 0)):
        feeds = _feeds(traced, batch, length, past_length if past else 0)
        for want, got in zip(_run(traced, feeds), _run(fused, feeds), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("change", "reader"),
    [
        ("reader", "q_t"),  # a transposed query read by something else too
        ("reader", "y4"),  # the 4-D output read by something else too
        ("perm", None),  # a Transpose that is not [0, 2, 1, 3]
        ("target", None),  # a Reshape target computed, not a constant
    ],
)
def test_what_it_cannot_prove_stays_as_traced(change: str, reader: str | None) -> None:
    model = _traced(rotary=False, past=True, extra_reader=reader, perm=[0, 2, 3, 1] if change == "perm" else None)
    if change == "target":
        target = next(i for i in model.graph.initializer if i.name == "q_target")
        model.graph.initializer.remove(target)
        model.graph.node.insert(0, helper.make_node("Identity", ["q_target_stored"], ["q_target"]))
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1, DIM], np.int64), "q_target_stored"))
    before = [n.op_type for n in model.graph.node]
    assert fold_attention_layout(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def _second_attention(model: onnx.ModelProto, rewritable: bool) -> None:
    """Add a second Attention that reads the first (rotary) one's appended cache: its own query
    (through Reshape, Transpose and RotaryEmbedding like the first's, if `rewritable`; else
    already 4-D), its output transposed and reshaped back to a graph output."""
    if rewritable:
        model.graph.input.append(helper.make_tensor_value_info("q2", TensorProto.FLOAT, ["batch", "length", HEADS * DIM]))
        model.graph.node.extend(
            [
                helper.make_node("Reshape", ["q2", "q_target"], ["q2_4d"]),
                helper.make_node("Transpose", ["q2_4d"], ["q2_4t"], perm=[0, 2, 1, 3]),
                helper.make_node("RotaryEmbedding", ["q2_4t", "cos", "sin"], ["q2_t"]),
            ]
        )
    else:
        model.graph.input.append(helper.make_tensor_value_info("q2_t", TensorProto.FLOAT, ["batch", HEADS, "length", DIM]))
    model.graph.node.extend(
        [
            helper.make_node("Attention", ["q2_t", "present_key", "present_value", "mask"], ["y2_4d"]),
            helper.make_node("Transpose", ["y2_4d"], ["y2_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["y2_t", "y_target"], ["y2"]),
        ]
    )
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", "length", HEADS * DIM]))


def _assert_same_outputs(traced: onnx.ModelProto, fused: onnx.ModelProto, past: bool = True) -> None:
    onnx.checker.check_model(fused, full_check=True)
    for batch, length, past_length in ((2, 5, 3), (1, 1, 9)):
        feeds = _feeds(traced, batch, length, past_length if past else 0)
        for want, got in zip(_run(traced, feeds), _run(fused, feeds), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rewritable", [True, False])
def test_a_cache_two_attentions_read_is_taken_over_by_one(rewritable: bool) -> None:
    # Rewriting both would make two nodes produce present_key and present_value.
    traced = _traced(rotary=True, past=True)
    _second_attention(traced, rewritable)
    fused = onnx.ModelProto()
    fused.CopyFrom(traced)
    assert fold_attention_layout(fused) == 1
    assert [len(n.input) for n in fused.graph.node if n.op_type == "Attention"] == [6, 4]
    _assert_same_outputs(traced, fused)


def _two_layers(past: bool) -> onnx.ModelProto:
    """Two traced rotary layers side by side, the second's names suffixed `_2`."""
    first, second = _traced(rotary=True, past=past), _traced(rotary=True, past=past)
    renamed = {}
    for value in [*second.graph.input, *second.graph.output, *second.graph.initializer]:
        renamed[value.name] = f"{value.name}_2"
        value.name = renamed[value.name]
    for node in second.graph.node:
        node.input[:] = [renamed.get(name, f"{name}_2") for name in node.input]
        node.output[:] = [f"{name}_2" for name in node.output]
    graph = first.graph
    graph.input.extend(second.graph.input)
    graph.output.extend(second.graph.output)
    graph.initializer.extend(second.graph.initializer)
    graph.node.extend(second.graph.node)
    return first


def _mask_from_cache(model: onnx.ModelProto, attention_output: str, cache: str) -> None:
    """The Attention writing `attention_output` masks with mask + 0 · sum(cache): the same
    values, but computed from an appended cache, which the fused form would produce itself."""
    attention = next(n for n in model.graph.node if n.op_type == "Attention" and n.output[0] == attention_output)
    tag = attention_output
    attention.input[3] = f"{tag}_mask"
    if not any(i.name == "zero" for i in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    added = [
        helper.make_node("ReduceSum", [cache], [f"{tag}_sum"]),
        helper.make_node("Mul", [f"{tag}_sum", "zero"], [f"{tag}_nothing"]),
        helper.make_node("Add", ["mask", f"{tag}_nothing"], [f"{tag}_mask"]),
    ]
    nodes = list(model.graph.node)
    after = next(i for i, n in enumerate(nodes) if cache in n.output) + 1  # the Attentions keep their order where they can
    del model.graph.node[:]
    model.graph.node.extend(_topological([*nodes[:after], *added, *nodes[after:]]))


@pytest.mark.parametrize("case", ["own cache", "crossed caches", "claimed cache"])
def test_a_rewrite_that_would_make_a_cycle_stays_as_traced(case: str) -> None:
    # The layer whose rewrite would make the fused Attention read what it produces stays as
    # traced (no error), and the others are rewritten: a layer beside it; of two layers that
    # read each other's cache, one; of two Attentions sharing a cache, the second, once the
    # first is left as traced.
    if case == "claimed cache":
        traced = _traced(rotary=True, past=True)
        _second_attention(traced, rewritable=True)
        _mask_from_cache(traced, "y4", "present_key")
        assert [n.output[0] for n in traced.graph.node if n.op_type == "Attention"] == ["y4", "y2_4d"]  # the first claims first
    else:
        traced = _two_layers(past=True)
        _mask_from_cache(traced, "y4", "present_key" if case == "own cache" else "present_key_2")
        if case == "crossed caches":
            _mask_from_cache(traced, "y4_2", "present_key")
    fused = onnx.ModelProto()
    fused.CopyFrom(traced)
    assert fold_attention_layout(fused) == 1
    _assert_same_outputs(traced, fused)


def test_unnamed_layers_get_distinct_new_tensors() -> None:
    # Two layers whose nodes carry no names: the rotated projections must not share a name.
    traced = _two_layers(past=False)
    for node in traced.graph.node:
        node.name = ""
    fused = onnx.ModelProto()
    fused.CopyFrom(traced)
    assert fold_attention_layout(fused) == 2
    _assert_same_outputs(traced, fused, past=False)
