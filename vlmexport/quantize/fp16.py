"""fp16: weights and compute in float16, graph inputs and outputs kept float32.

Conversion is onnxruntime.transformers' `convert_float_to_float16` (keep_io_types, so callers
and the KV cache feeds stay float32). What stays float32 is decided by measurement:

- every node whose float32 output, measured on real inputs (`activation_ranges`), comes within
  `HEADROOM`× of the float16 limit (65504): a model that overflows there gives inf/NaN, not a
  slightly different caption (attention masks' float32-minimum constants excepted, see `masking`);
  neighbouring kept nodes exchange float32 directly (`float32_islands`);
- `ALWAYS_FP32_OPS`: op types to keep on every model — none so far: the measured-hot nodes cover
  the real-weights decoder (RMSNorm's squares, the residual stream), KL 4e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

FP16_MAX = 65504.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A node's measured peak may be exceeded by other images; 8× keeps a margin of 3 bits.
HEADROOM = 8.0
ALWAYS_FP32_OPS: tuple[str, ...] = ()


@dataclass(frozen=True)
class ActivationRange:
    """The largest magnitude one node output reached in float32, over the measured inputs."""

    component: str
    tensor: str
    op_type: str
    peak: float

    @property
    def masking(self) -> bool:
        """float32's extreme value, which attention masks add on purpose: the converter clamps it to
        -65504, which masks just as well, so it is no reason to keep a node in float32."""
        return self.peak >= FLOAT32_MAX * 0.99

    @property
    def hot(self) -> bool:
        """Within HEADROOM of overflowing float16 (and not a mask)."""
        return not self.masking and self.peak * HEADROOM >= FP16_MAX

    @property
    def fp16_fraction(self) -> float:
        """How much of float16's range the peak uses (≥ 1 overflows)."""
        return self.peak / FP16_MAX


def activation_ranges(model_path: Path, component: str, feeds: list[dict[str, np.ndarray]]) -> list[ActivationRange]:
    """Peak |value| of every float node output of the float32 graph on `feeds`, largest first.

    Each such output gets an Abs → ReduceMax (keepdims: an empty tensor reduces without error),
    appended at the graph's end (after every producer, so the order stays topological); the peaks
    come back as scalars, so memory stays that of one normal run. Written by hand: onnxruntime's
    MinMax calibrator computes the same (a ReduceMin and a ReduceMax per tensor; a tensor empty in
    every feed is inf there, 0 here) but places each node by a linear search of the graph, which
    is quadratic: on the real-weights model's decoder (1435 outputs) 24.8 s against 13.9 s here,
    its three graphs 31 s against 21 s (AMD EPYC, AVX2). tests/test_quantize.py checks both agree.
    """
    from vlmexport.quantize.feeds import probe

    model = onnx.load(str(model_path))
    typed = onnx.shape_inference.infer_shapes(model)  # the outputs' types: only float ones are peaks
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.output]}
    producers = {out: node.op_type for node in model.graph.node for out in node.output if out}
    tensors = [name for name in producers if types.get(name) == onnx.TensorProto.FLOAT]
    peaks = [f"{name}__abs_max" for name in tensors]
    for name, peak in zip(tensors, peaks, strict=True):
        model.graph.node.extend(
            [
                onnx.helper.make_node("Abs", [name], [f"{name}__abs"], name=f"{name}__abs"),
                onnx.helper.make_node("ReduceMax", [f"{name}__abs"], [peak], name=peak, keepdims=1),
            ]
        )
    highest = np.zeros(len(tensors))
    for values in probe(model, feeds, peaks):
        highest = np.maximum(highest, [float(v.max()) if v.size else 0.0 for v in values])
    ranges = [ActivationRange(component, name, producers[name], float(peak)) for name, peak in zip(tensors, highest, strict=True)]
    return sorted(ranges, key=lambda r: -r.peak)


def convert_fp16(model: onnx.ModelProto, ranges: list[ActivationRange], exclude: list[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The float16 form of `model`, with measured-hot nodes, `ALWAYS_FP32_OPS` and `exclude` in float32."""
    hot = {r.tensor for r in ranges if r.hot}
    keep = sorted({n.name for n in model.graph.node if hot & set(n.output) or n.op_type in ALWAYS_FP32_OPS} | set(exclude))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    bridged = float32_islands(converted, set(keep))
    record = {
        "method": "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types)",
        "fp32_nodes": len(keep),
        "fp32_round_trips_removed": bridged,
        "fp32_reason": f"peak ≥ 1/{HEADROOM:g} of 65504 measured ({len(hot)} outputs), ops {list(ALWAYS_FP32_OPS)}, excluded {len(exclude)}",
        "peak_activation": max((r.peak for r in ranges if not r.masking), default=0.0),
    }
    return converted, record


def float32_islands(model: onnx.ModelProto, kept: set[str]) -> int:
    """Join neighbouring float32 nodes directly, in place; returns how many links were joined.

    The converter wraps every kept node on its own: its outputs are cast to float16 and cast back
    to float32 at the next kept node. A run of kept nodes (RMSNorm's Pow → ReduceMean → …) then
    still passes its values through float16 between them — the squared residual stream of the
    real-weights decoder (5.9e8) overflows right there, and keeping RMSNorm "in float32" changed
    nothing (mean KL 6.5 nats either way, measured). Written by hand: the converter has no option
    for it, and onnxruntime's optimizers keep lossy Cast pairs by design.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int:
        return next(a.i for a in node.attribute if a.name == "to")

    joined: dict[str, str] = {}
    for node in graph.node:
        # Only the converter's own casts (named by it): an original Cast it retargeted may read an integer.
        if node.op_type != "Cast" or not node.name.endswith("_cast_to_fp32_node") or node.output[0] in outputs:
            continue
        down = producers.get(node.input[0])
        if down is None or down.op_type != "Cast" or not down.name.endswith("_cast_to_fp16_node") or cast_to(down) != onnx.TensorProto.FLOAT16:
            continue
        source = producers.get(down.input[0])
        if source is not None and source.name in kept:  # a kept node's float32 output
            joined[node.output[0]] = down.input[0]
    for node in graph.node:
        node.input[:] = [joined.get(name, name) for name in node.input]
    nodes = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in joined)]
    used = {name for n in nodes for name in n.input} | outputs
    nodes = [n for n in nodes if n.op_type != "Cast" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(joined)
