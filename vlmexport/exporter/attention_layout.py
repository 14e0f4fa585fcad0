"""Let each layer's ONNX `Attention` take the projections as they come, [B, S, H·D], and the KV
cache itself.

The opset-23 graphs (attention.py) are traced from transformers' attention modules, which
reshape each projection to [B, S, H, D] and transpose it to [B, H, S, D] (rotating queries and
keys there), append keys and values to the cache with a Concat, and transpose and reshape the
output back: ten nodes around the one that computes, each a kernel launch at every decode
step, six of them copies (the transposes, and the whole cache at every step). ONNX `Attention` does all of that itself — 3-D query, key and value
with `q_num_heads`/`kv_num_heads`, `past_key`/`past_value` in, `present_key`/`present_value`
out — and `RotaryEmbedding` rotates a 3-D input given `num_heads`. The tracer cannot emit that
form: the reshapes, transposes and the cache's Concat are transformers' own code, traced
before and after the function attention.py substitutes. So this pass rewrites the graph.

Rewritten only where the graph computes exactly what the fused form does: Transposes with perm
[0, 2, 1, 3]; constant Reshape targets that, at sampled sizes of the dynamic axes, split the
last axis into heads of D and merge it back, batch and sequence kept (a row-major reshape
[B, S, H·D] ↔ [B, S, H, D] is only that); the Concat appending to a 4-D cache on the sequence axis
(Attention's own `past_key` semantics); Attention and RotaryEmbedding with no attributes the fused form would change (`scale`
only; no position ids). Intermediate tensors read by anything else leave the layer as traced,
and so does everything where the Reshape targets were not folded to constants (simplify.py).
The outputs keep their names, so the bundle's interface is the same; onnxruntime computes
bit-identical outputs (tests/test_attention_layout.py), and the export's smoke parity holds
every graph to PyTorch.

Measured on the real-weights model (SmolLM2-135M decoder, AMD EPYC AVX512-VNNI, 2 threads,
old and new graphs alternating in one process): a cached step runs 510 nodes after
onnxruntime's fusions instead of 1,188, the int8 step 13.8–14.0 → 12.1–12.2 ms, fp32
24.2–24.6 → 21.9–23.8 ms (two runs).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from vlmexport.exporter.simplify import remove_unused, resolve_reshape

HEADS_FIRST = [0, 2, 1, 3]
SAMPLE_SIZES = (3, 5, 7)  # the dynamic axes' values at which each Reshape target is checked


@dataclass
class _Projection:
    """Query, key or value as Attention reads it: the 3-D tensor it came from, its heads, the
    rotary embedding's (cos, sin) if it is rotated."""

    source: str
    heads: int
    rotary: tuple[str, str] | None


class _Graph:
    """What the rewrite looks up: producers, readers, int64 constants, inferred shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        inferred = shape_inference.infer_shapes(model).graph
        self.dims = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.input, *inferred.value_info, *inferred.output]
            if v.type.tensor_type.HasField("shape")
        }
        self.producer = {output: node for node in graph.node for output in node.output}
        self.readers: dict[str, list[onnx.NodeProto | None]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        for output in graph.output:
            self.readers.setdefault(output.name, []).append(None)  # a graph output is read too
        self.constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 1 and i.data_type == onnx.TensorProto.INT64}

    def made_by(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and not node.domain else None

    def only_reader(self, name: str, op: str) -> onnx.NodeProto | None:
        found = self.readers.get(name, [])
        node = found[0] if len(found) == 1 else None
        return node if node is not None and node.op_type == op and not node.domain else None

    def copied_from(self, name: str) -> str:
        """`name`, or the tensor it copies through one-input Concats and Identities (transformers'
        cache traces a one-input Concat of the first layer's past keys)."""
        node = self.producer.get(name)
        while node is not None and not node.domain and (node.op_type == "Identity" or (node.op_type == "Concat" and len(node.input) == 1)):
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def read_once(self, name: str) -> bool:
        return len(self.readers.get(name, [])) == 1

    def target(self, reshape: onnx.NodeProto) -> np.ndarray | None:
        """A Reshape's constant target, if it has one and zeros in it copy axes (allowzero 0)."""
        if any(a.name == "allowzero" and a.i for a in reshape.attribute):
            return None
        return self.constants.get(reshape.input[1])


def fold_attention_layout(model: onnx.ModelProto) -> int:
    """Rewrite every Attention node that matches (the module's docstring) to the 3-D form with
    the cache as its input and output, in place, and drop the nodes left unused. Returns the
    number of Attention nodes rewritten."""
    if not any(n.op_type == "Attention" and not n.domain for n in model.graph.node):
        return 0
    graph = _Graph(model)
    candidates = [rewrite for n in model.graph.node if n.op_type == "Attention" and not n.domain and (rewrite := _rewrite(n, graph)) is not None]
    traced = list(model.graph.node)
    rewrites = _compatible(traced, candidates, acyclic=False)
    nodes = _apply(traced, rewrites)
    if nodes is None:
        # Some rewrite made a node read what it produces (say, a mask computed from the appended
        # cache): keep, in order, only those that leave the graph acyclic; the others stay as traced.
        rewrites = _compatible(traced, candidates, acyclic=True)
        nodes = _apply(traced, rewrites)
    if rewrites and nodes is not None:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        remove_unused(model.graph)
    return len(rewrites)


def _compatible(nodes: list[onnx.NodeProto], candidates: list[_Rewrite], acyclic: bool) -> list[_Rewrite]:
    """The candidates, in order, that take over no node an earlier kept one took (a cache Concat
    two Attentions read: both would produce its output) and, if `acyclic`, leave no cycle."""
    kept: list[_Rewrite] = []
    claimed: set[int] = set()
    for rewrite in candidates:
        taken = {id(node) for node in rewrite.gone}
        if claimed & taken or (acyclic and _apply(nodes, [*kept, rewrite]) is None):
            continue
        kept.append(rewrite)
        claimed |= taken
    return kept


@dataclass
class _Rewrite:
    attention: onnx.NodeProto
    gone: list[onnx.NodeProto]  # the nodes whose outputs the new nodes produce
    new: list[onnx.NodeProto]


def _apply(nodes: list[onnx.NodeProto], rewrites: list[_Rewrite]) -> list[onnx.NodeProto] | None:
    """`nodes` with `rewrites` made, in an order ONNX accepts; None if they made a cycle."""
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for rewrite in rewrites:
        replaced.update({id(node): [] for node in rewrite.gone})
        replaced[id(rewrite.attention)] = rewrite.new
    return _topological([new for node in nodes for new in replaced.get(id(node), [node])])


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """`nodes` in an order ONNX accepts, each as early as in `nodes` where it can be (a new
    Attention takes the place of the old one, but makes the cache a sliding window crops —
    Mistral's Slice of the appended cache — before that place); None if they form a cycle."""
    produced = {output: index for index, node in enumerate(nodes) for output in node.output}
    waiting = [{produced[name] for name in node.input if name in produced} for node in nodes]
    readers: dict[int, list[int]] = {}
    for index, needs in enumerate(waiting):
        for need in needs:
            readers.setdefault(need, []).append(index)
    ready = [index for index, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(nodes[index])
        for reader in readers.get(index, []):
            waiting[reader].discard(index)
            if not waiting[reader]:
                heapq.heappush(ready, reader)
    return order if len(order) == len(nodes) else None


def _rewrite(attention: onnx.NodeProto, graph: _Graph) -> _Rewrite | None:
    """The nodes that replace `attention` and those it takes over, or None: leave as traced."""
    attributes = {a.name: a for a in attention.attribute}
    if set(attributes) - {"scale"} or len(attention.output) != 1 or len(attention.input) not in (3, 4):
        return None
    query, key, value = attention.input[:3]
    mask = attention.input[3] if len(attention.input) == 4 else ""
    appended = [graph.made_by(key, "Concat"), graph.made_by(value, "Concat")]
    caches = [node for node in appended if node is not None and _appends(node, graph)]
    if len(caches) == 2:
        past = [graph.copied_from(node.input[0]) for node in caches]
        key, value = caches[0].input[1], caches[1].input[1]
    elif any(appended):
        return None
    else:
        past = []
    q, k, v = _projection(query, graph, rotated=True), _projection(key, graph, rotated=True), _projection(value, graph, rotated=False)
    merge = _merge(attention.output[0], graph)
    if q is None or k is None or v is None or merge is None or k.heads != v.heads or (q.rotary is None) != (k.rotary is None):
        return None
    new, sources = [], []
    # Named after the output they replace, which is unique in the graph (node names need not be).
    for projection, name in ((q, f"{attention.output[0]}/query_rotated"), (k, f"{attention.output[0]}/key_rotated")):
        if projection.rotary is not None:
            new.append(helper.make_node("RotaryEmbedding", [projection.source, *projection.rotary], [name], name=name, num_heads=projection.heads))
        sources.append(name if projection.rotary is not None else projection.source)
    fused_inputs = [*sources, v.source, mask, *past] if past else [*sources, v.source, *([mask] if mask else [])]
    scale = {"scale": attributes["scale"].f} if "scale" in attributes else {}
    outputs = [merge[-1].output[0], *(node.output[0] for node in caches)]
    new.append(helper.make_node("Attention", fused_inputs, outputs, name=attention.name, q_num_heads=q.heads, kv_num_heads=k.heads, **scale))
    return _Rewrite(attention, [*caches, *merge], new)


def _appends(node: onnx.NodeProto, graph: _Graph) -> bool:
    """A Concat of a cache [B, H, P, D] (a graph input, or the empty one a first pass makes)
    and one tensor, on the sequence axis: what Attention does with `past_key`/`past_value`."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    past = graph.dims.get(graph.copied_from(node.input[0])) if len(node.input) == 2 else None
    return past is not None and len(past) == 4 and axis in (2, -2)


def _projection(name: str, graph: _Graph, rotated: bool) -> _Projection | None:
    """`name` = [RotaryEmbedding ∘] Transpose(0, 2, 1, 3) ∘ Reshape([B, S, H·D] → [B, S, H, D]),
    each intermediate read by the next node only."""
    if not graph.read_once(name):
        return None
    rotary = graph.made_by(name, "RotaryEmbedding") if rotated else None
    if rotary is not None:
        if rotary.attribute or len(rotary.input) != 3 or not graph.read_once(rotary.input[0]):
            return None
        name = rotary.input[0]
    transpose = graph.made_by(name, "Transpose")
    if transpose is None or _perm(transpose) != HEADS_FIRST or not graph.read_once(transpose.input[0]):
        return None
    reshape = graph.made_by(transpose.input[0], "Reshape")
    target = None if reshape is None else graph.target(reshape)
    source = None if reshape is None else graph.dims.get(reshape.input[0])
    if reshape is None or target is None or source is None or len(source) != 3 or source[2] is None:
        return None
    shapes = _reshaped(target, source)
    heads = {out[2] for out in shapes if out is not None and len(out) == 4}
    if len(heads) != 1 or any(out is None or out[:2] != sample[:2] or out[2] * out[3] != source[2] for out, sample in zip(shapes, _samples(source))):
        return None
    return _Projection(reshape.input[0], heads.pop(), None if rotary is None else (rotary.input[1], rotary.input[2]))


def _merge(name: str, graph: _Graph) -> list[onnx.NodeProto] | None:
    """[Transpose(0, 2, 1, 3), Reshape([B, S, H, D] → [B, S, H·D])] reading Attention's `name`, alone."""
    transpose = graph.only_reader(name, "Transpose")
    if transpose is None or _perm(transpose) != HEADS_FIRST:
        return None
    reshape = graph.only_reader(transpose.output[0], "Reshape")
    target = None if reshape is None else graph.target(reshape)
    source = graph.dims.get(transpose.output[0])
    if reshape is None or target is None or source is None or len(source) != 4 or source[2] is None or source[3] is None:
        return None
    if any(out != (*sample[:2], sample[2] * sample[3]) for out, sample in zip(_reshaped(target, source), _samples(source))):
        return None
    return [transpose, reshape]


def _samples(shape: list[int | None]) -> list[tuple[int, ...]]:
    return [tuple(size if d is None else d for d in shape) for size in SAMPLE_SIZES]


def _reshaped(target: np.ndarray, shape: list[int | None]) -> list[tuple[int, ...] | None]:
    """The Reshape's output shape at each sample of `shape`'s dynamic axes (None where it fails)."""
    found = []
    for sample in _samples(shape):
        out = resolve_reshape([int(d) for d in target], sample)
        found.append(out if out is not None and int(np.prod(out)) == int(np.prod(sample)) else None)
    return found


def _perm(node: onnx.NodeProto) -> list[int]:
    return [int(i) for a in node.attribute if a.name == "perm" for i in a.ints]
