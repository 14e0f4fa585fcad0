"""Decode-step floor: how close can ONNX Runtime come to the bandwidth bound with this bundle?

    .venv/bin/python bench/decode_floor.py --onnx-dir BUNDLE [--variant int8] [--threads 2]
        [--past 225] [--runs 200]

`vlmexport bench` compares each variant's cached decode step with a lower bound: the weight
bytes one step reads / the machine's read bandwidth. This script asks what part of the
distance is the graph's and what part the runtime's. In one process, at `threads`, alternating
so that the machine's drift hits all alike, it times:

  step       the bundle's own cached step (batch 1, one token, `past` cached positions);
  matmuls    a graph of only that step's weight matmuls: the variant's own weights and ops
             (int8: MatMulNBits, or DynamicQuantizeLinear + MatMulInteger for --recipe dynamic, as written),
             nothing else in the graph;
  attention  only the step's attention over its cache: per layer one ONNX Attention node with
             3-D query/key/value and the past as inputs, two RotaryEmbedding nodes where the
             decoder is rotary — the fewest nodes the operator set allows;

and prints each with its ratio to the bound. `matmuls + attention` is what a graph with no
other work at all would take; if it exceeds 1.5 × bound, no rewrite of this bundle's graphs
meets the issue's "int8 decode within 1.5× of the bound" with this runtime on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmexport.bundle.manifest import decoder_graphs, read_manifest
from vlmexport.runtime.bench import memory_bandwidth


def weight_matmuls(decoder: onnx.ModelProto) -> onnx.ModelProto:
    """A graph's weight matmuls alone (MatMul, MatMulInteger after a quantized activation, or
    MatMulNBits), each fed an activation of its width and any number of rows. A MatMul of 8-bit
    codes computed in float (blockwise.matmul_in_float) keeps its DequantizeLinear and Reshape:
    they run with it."""
    graph = decoder.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> np.ndarray | None:
        """A stored tensor, the tied head's Transpose of one, or float16-stored weights or scales
        cast back to float32 (and rescaled by a Mul) at load; None for an activation."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is None or node.op_type not in ("Transpose", "Cast", "Mul", "Reshape"):
            return None
        sources = [constant(i) for i in node.input]
        if any(source is None for source in sources):
            return None
        if node.op_type == "Mul":
            return (sources[0] * sources[1]).astype(np.float32)
        if node.op_type == "Reshape":  # numpy's reshape, unless ONNX's 0 ("keep this axis") is in the shape
            return None if 0 in sources[1] else sources[0].reshape(sources[1])
        return sources[0].T if node.op_type == "Transpose" else sources[0].astype(np.float32)

    def dequantized(name: str) -> list[onnx.NodeProto] | None:
        """The DequantizeLinear and Reshape that make a float-computed MatMul's weight, on copies of their constants."""
        reshape = producers.get(name)
        dq = producers.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        for source in [*dq.input, reshape.input[1]]:
            if source and source not in {i.name for i in initializers}:
                initializers.append(numpy_helper.from_array(constant(source), source))
        return [dq, reshape]

    nodes, initializers, outputs, widths = [], [], [], set()
    for index, node in enumerate(n for n in graph.node if n.op_type in ("MatMulInteger", "MatMul", "MatMulNBits")):
        if node.op_type == "MatMulNBits":  # blockwise weights: the same node, its own initializers
            width = next(a.i for a in node.attribute if a.name == "K")
            widths.add(width)
            stored = [name for name in node.input[1:] if name]
            initializers += [numpy_helper.from_array(constant(name), name) for name in stored if name not in {i.name for i in initializers}]
            copy = helper.make_node("MatMulNBits", [f"x{width}", *node.input[1:]], [f"y{index}"], domain="com.microsoft")
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
            outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None))
            continue
        expansion = dequantized(node.input[1]) if node.op_type == "MatMul" else None
        if expansion is not None:
            width = int(constant(expansion[1].input[1])[0])  # the Reshape to the weight's own [K, N]
            widths.add(width)
            nodes += [*expansion, helper.make_node("MatMul", [f"x{width}", node.input[1]], [f"y{index}"])]
            outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None))
            continue
        weight = constant(node.input[1])
        if weight is None:
            continue  # an activation × activation product (decomposed attention)
        width = weight.shape[0]
        widths.add(width)
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        if node.op_type == "MatMul":
            nodes.append(helper.make_node("MatMul", [f"x{width}", f"w{index}"], [f"y{index}"]))
        else:
            initializers.append(numpy_helper.from_array(constant(node.input[3]), f"z{index}"))
            nodes += [
                helper.make_node("MatMulInteger", [f"x{width}q", f"w{index}", f"x{width}z", f"z{index}"], [f"i{index}"]),
                helper.make_node("Cast", [f"i{index}"], [f"c{index}"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"c{index}", f"x{width}s"], [f"y{index}"]),
            ]
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None))
    if any(n.op_type == "MatMulInteger" for n in nodes):
        nodes = [helper.make_node("DynamicQuantizeLinear", [f"x{w}"], [f"x{w}q", f"x{w}s", f"x{w}z"]) for w in sorted(widths)] + nodes
    inputs = [helper.make_tensor_value_info(f"x{w}", TensorProto.FLOAT, ["rows", w]) for w in sorted(widths)]
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, initializers)
    opset = 21 if any(n.op_type == "DequantizeLinear" for n in nodes) else 18  # blocked DequantizeLinear
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def attention_only(layers: int, heads: int, kv_heads: int, head_dim: int, rotary: bool) -> onnx.ModelProto:
    """Per layer: RotaryEmbedding on q and k (if rotary), then Attention with the past."""
    nodes, inputs, outputs = [], [], []
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "cos", "sin", "mask")]
    for layer in range(layers):
        inputs += [helper.make_tensor_value_info(f"pk{layer}", TensorProto.FLOAT, None), helper.make_tensor_value_info(f"pv{layer}", TensorProto.FLOAT, None)]
        q, k = ("q", "k") if layer == 0 else (f"y{layer - 1}", "k")
        if rotary:
            nodes.append(helper.make_node("RotaryEmbedding", [q, "cos", "sin"], [f"qr{layer}"], num_heads=heads))
            nodes.append(helper.make_node("RotaryEmbedding", [k, "cos", "sin"], [f"kr{layer}"], num_heads=kv_heads))
            q, k = f"qr{layer}", f"kr{layer}"
        nodes.append(
            helper.make_node(
                "Attention", [q, k, "k", "mask", f"pk{layer}", f"pv{layer}"], [f"y{layer}", f"prk{layer}", f"prv{layer}"],
                q_num_heads=heads, kv_num_heads=kv_heads,
            )
        )  # fmt: skip
        outputs += [helper.make_tensor_value_info(f"{n}{layer}", TensorProto.FLOAT, None) for n in ("prk", "prv")]
    outputs.append(helper.make_tensor_value_info(f"y{layers - 1}", TensorProto.FLOAT, None))
    return helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs), opset_imports=[helper.make_opsetid("", 23)])


def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Floor:
    variant: str
    threads: int
    past: int
    weight_mb: float
    bandwidth_gbs: float
    bound_ms: float
    medians_ms: dict[str, float]

    def print(self) -> None:
        print(f"{self.variant} decoder, {self.weight_mb:.1f} MB of weights; {self.threads} threads; past {self.past}; "
              f"read bandwidth {self.bandwidth_gbs:.1f} GB/s; bound {self.bound_ms:.2f} ms (1.5 × bound {1.5 * self.bound_ms:.2f} ms)")
        for name, ms in self.medians_ms.items():
            print(f"  {name:20s} {ms:7.2f} ms  {ms / self.bound_ms:5.2f} × bound")


def measure_floor(onnx_dir: Path, variant: str = "int8", threads: int = 2, past: int = 225, runs: int = 200) -> Floor:
    """The step, its weight matmuls alone and its attention alone, alternating; see the docstring."""
    from vlmexport.exporter.attention import ROTARY_MODULES
    from vlmexport.runtime.bundle import open_bundle

    manifest = read_manifest(onnx_dir)
    facts = manifest.model
    layers, kv_heads, head_dim = int(facts["num_layers"]), int(facts["kv_heads"]), int(facts["head_dim"])
    heads = int(facts["embed_dim"]) // head_dim
    rotary = f"modeling_{facts['text_type']}" in ROTARY_MODULES
    rng = np.random.default_rng(0)
    step_component = decoder_graphs(manifest.layout)[1]
    bundle = open_bundle(onnx_dir, variant, threads, components=[step_component])
    decoder = onnx.load(str(onnx_dir / manifest.variants[variant][step_component]))
    weight_bytes = sum(numpy_helper.to_array(i).nbytes for i in decoder.graph.initializer)  # as `vlmexport bench` counts
    matmuls = weight_matmuls(decoder)
    del decoder
    matmul_session = session(matmuls, threads)
    matmul_feeds = {i.name: rng.standard_normal((1, int(i.name[1:]))).astype(np.float32) for i in matmuls.graph.input}
    attention_session = session(attention_only(layers, heads, kv_heads, head_dim, rotary), threads)
    attention_feeds = {
        "q": rng.standard_normal((1, 1, heads * head_dim)).astype(np.float32),
        "k": rng.standard_normal((1, 1, kv_heads * head_dim)).astype(np.float32),
        "cos": rng.standard_normal((1, 1, head_dim // 2)).astype(np.float32),
        "sin": rng.standard_normal((1, 1, head_dim // 2)).astype(np.float32),
        "mask": np.zeros((1, 1, 1, past + 1), np.float32),  # additive, as the exported graphs pass it
        **{f"p{kv}{layer}": rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32) for layer in range(layers) for kv in "kv"},
    }
    cache = [rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32) for _ in bundle.empty_past(1)]
    token = np.array([[1]], np.int64)
    jobs: dict[str, Callable[[], object]] = {
        "step": lambda: bundle.step(token, cache),
        "matmuls": lambda: matmul_session.run(None, matmul_feeds),
        "attention": lambda: attention_session.run(None, attention_feeds),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        for _ in range(5):
            job()
    for _ in range(max(runs // 20, 1)):
        for name, job in jobs.items():
            for _ in range(20):
                started = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - started)
    bandwidth = max(memory_bandwidth(threads=threads) for _ in range(2))
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    medians["matmuls + attention"] = medians["matmuls"] + medians["attention"]
    return Floor(variant, threads, past, weight_bytes / 1e6, bandwidth / 1e9, weight_bytes / bandwidth * 1e3, medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", type=int, default=225, help="cached positions (196 prefix + 29 tokens: a 30-token caption's last step)")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    measure_floor(args.onnx_dir, args.variant, args.threads, args.past, args.runs).print()


if __name__ == "__main__":
    main()
