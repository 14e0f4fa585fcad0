"""Which nodes' quantization costs a real model the most, measured — `--keep-fp32 auto`.

One ONNX graph holds both forms of every node the recipe changes: the `high` form (the fp32
node) and the `low` form the recipe writes, behind an `If` whose
condition is one element of a boolean graph input. One onnxruntime session then measures any
subset of nodes quantized: each node alone (the ranking: the KL its quantization costs on its
own), then the recipe with its k most costly nodes kept high (the choice). Written by hand
because onnxruntime's quantization tools have no sensitivity analysis for these recipes, and a
session per subset would serialise and load the whole decoder (0.5 GB at full size) ~130 times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmexport.quantize.fidelity import Fidelity, FidelitySet, compare, decoder_logits
from vlmexport.runtime.bundle import Bundle, session

SWITCH_INPUT = "vlmexport_quantize_switch"
SWITCHABLE_OPS = frozenset({"MatMul", "Gemm", "Gather", "Conv"})


@dataclass(frozen=True)
class Switchable:
    """A graph whose `nodes` each run in their low form where the switch input says True."""

    model: onnx.ModelProto
    nodes: list[str]  # names of the high graph's nodes, in switch order
    high_bytes: list[int]  # weight bytes each node reads in its high form
    low_bytes: list[int]  # ... and in its low form


@dataclass(frozen=True)
class NodeCost:
    """What quantizing one node alone costs, against fp32."""

    node: str
    kl: float
    top1: float
    high_bytes: int
    low_bytes: int


@dataclass(frozen=True)
class Choice:
    """The fewest nodes kept high that meet the targets, and how the result measured."""

    kept: list[str]
    ranking: list[NodeCost]
    fidelity: Fidelity  # the recipe with `kept` kept high
    all_low: Fidelity  # the recipe with nothing kept
    met: bool  # False: even keeping every ranked node high missed the targets
    quantized_share: float  # share of the ranked weight bytes in low form


def switchable(high: onnx.ModelProto, low: onnx.ModelProto) -> Switchable:
    """`high` (modified in place) with every node whose output `low` computes otherwise made
    switchable between the two forms."""
    graph = high.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    high_inits = {i.name: i for i in graph.initializer}
    low_inits = {i.name: i for i in low.graph.initializer}
    producers = {o: i for i, n in enumerate(low.graph.node) for o in n.output}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in high_inits}
    nodes: list[onnx.NodeProto] = []
    names: list[str] = []
    high_bytes: list[int] = []
    low_bytes: list[int] = []
    added: set[str] = set()
    for node in graph.node:
        chain = _low_chain(node, low.graph, producers, known, low_inits) if node.op_type in SWITCHABLE_OPS else None
        if not chain:
            nodes.append(node)
            continue
        j = len(names)
        used = sorted({i for n in chain for i in n.input if i in low_inits})
        renamed = {name: (f"{name}__low" if name in high_inits else name) for name in used}
        for name in used:
            if renamed[name] not in added:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(low_inits[name])
                tensor.name = renamed[name]
                graph.initializer.append(tensor)
                added.add(renamed[name])
        nodes += _switch(node, chain, j, renamed)
        names.append(node.name)
        weights = [transposed.get(i, i) for i in node.input]  # a tied head reads its table through a Transpose
        high_bytes.append(sum(_nbytes(high_inits[i]) for i in weights if i in high_inits))
        low_bytes.append(sum(_nbytes(low_inits[i]) for i in used))
    del graph.node[:]
    graph.node.extend(nodes)
    for j in range(len(names)):
        graph.initializer.append(numpy_helper.from_array(np.array(j, np.int64), f"{SWITCH_INPUT}_index_{j}"))
    graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, TensorProto.BOOL, [len(names)]))
    domains = {o.domain for o in high.opset_import}
    high.opset_import.extend(o for o in low.opset_import if o.domain not in domains)
    return Switchable(high, names, high_bytes, low_bytes)


def _nbytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _low_chain(
    node: onnx.NodeProto, low: onnx.GraphProto, producers: dict[str, int], known: set[str], low_inits: dict
) -> list[onnx.NodeProto] | None:
    """The low graph's nodes that compute `node`'s output from tensors the high graph has too
    (None when the low graph computes it the same way)."""
    index = producers.get(node.output[0])
    if index is None:
        return None
    first = low.node[index]
    if first.op_type == node.op_type and list(first.input) == list(node.input):
        return None
    found, stack = {index}, [index]
    while stack:
        for name in low.node[stack.pop()].input:
            if name and name not in known and name not in low_inits and producers[name] not in found:
                found.add(producers[name])
                stack.append(producers[name])
    return [low.node[i] for i in sorted(found)]


def _switch(node: onnx.NodeProto, chain: list[onnx.NodeProto], j: int, initializers: dict[str, str]) -> list[onnx.NodeProto]:
    """Gather(switch, j) → If(low chain | the high node), producing the node's own outputs."""
    inner = {o: f"{o}__low{j}" for n in chain for o in n.output}
    low_nodes = []
    for n in chain:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = f"{n.name}__low{j}"
        copy.input[:] = [inner.get(i, initializers.get(i, i)) for i in n.input]
        copy.output[:] = [inner[o] for o in n.output]
        low_nodes.append(copy)
    high_node = onnx.NodeProto()
    high_node.CopyFrom(node)
    high_node.name = f"{node.name}__high{j}"
    high_node.output[:] = [f"{o}__high{j}" for o in node.output]

    def branch(name: str, body: list[onnx.NodeProto], outputs: list[str]) -> onnx.GraphProto:
        return helper.make_graph(body, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])

    condition = f"{SWITCH_INPUT}_{j}"
    return [
        helper.make_node("Gather", [SWITCH_INPUT, f"{SWITCH_INPUT}_index_{j}"], [condition], name=f"{condition}_gather"),
        helper.make_node(
            "If", [condition], list(node.output), name=f"{node.name}__switch",
            then_branch=branch(f"low_{j}", low_nodes, [inner[o] for o in node.output]),
            else_branch=branch(f"high_{j}", [high_node], list(high_node.output)),
        ),
    ]  # fmt: skip


class _Switched:
    """A session fed the switch vector beside its usual feeds (what Bundle.first_pass runs)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.switch = np.zeros(0, bool)

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, {**feeds, SWITCH_INPUT: self.switch})


class Measurer:
    """Fidelity of any subset of a Switchable's nodes in low form, on one session."""

    def __init__(self, graph: Switchable, template: Bundle, component: str, fset: FidelitySet, margin: float) -> None:
        self.graph, self.fset, self.margin = graph, fset, margin
        self.switched = _Switched(session(graph.model.SerializeToString()))
        # The template's own sessions stay (the transformers.js layout embeds ids with embed_tokens).
        self.bundle = Bundle(template.path, template.manifest, "fp32", {**template.sessions, component: self.switched})

    def measure(self, low: set[str]) -> Fidelity:
        self.switched.switch = np.array([name in low for name in self.graph.nodes], bool)
        logits = decoder_logits(self.bundle, self.fset.prefixes, self.fset.ids)
        return compare(self.fset, logits, self.margin)


def rank(measurer: Measurer, on_node: Callable[[int, int], None] | None = None) -> list[NodeCost]:
    """Every switchable node quantized on its own, most costly first."""
    graph = measurer.graph
    costs = []
    for j, name in enumerate(graph.nodes):
        if on_node:
            on_node(j, len(graph.nodes))
        fidelity = measurer.measure({name})
        costs.append(NodeCost(name, fidelity.kl, fidelity.top1, graph.high_bytes[j], graph.low_bytes[j]))
    return sorted(costs, key=lambda c: -c.kl)


def keep_fewest(measurer: Measurer, ranking: list[NodeCost], max_kl: float, min_top1: float) -> Choice:
    """The smallest k such that keeping the k most costly nodes high meets the targets (binary
    search: keeping more of the costliest nodes is assumed not to hurt, which the final check verifies)."""
    order = [c.node for c in ranking]
    everything = set(order)

    def measured(k: int) -> Fidelity:
        return measurer.measure(everything - set(order[:k]))

    all_low = measured(0)
    if all_low.meets(max_kl, min_top1):
        return _choice([], ranking, all_low, all_low, True)
    low, high = 0, len(order)
    best = measured(high)
    if not best.meets(max_kl, min_top1):
        return _choice(order, ranking, best, all_low, False)
    while high - low > 1:
        middle = (low + high) // 2
        fidelity = measured(middle)
        if fidelity.meets(max_kl, min_top1):
            high, best = middle, fidelity
        else:
            low = middle
    return _choice(order[:high], ranking, best, all_low, True)


def _choice(kept: list[str], ranking: list[NodeCost], fidelity: Fidelity, all_low: Fidelity, met: bool) -> Choice:
    total = sum(c.high_bytes for c in ranking)
    quantized = sum(c.high_bytes for c in ranking if c.node not in set(kept))
    return Choice(kept, ranking, fidelity, all_low, met, quantized / total if total else 0.0)
