"""SmoothQuant-style outlier migration: move the activation outliers of a pretrained decoder
into the weights before quantization, where blockwise weight scales absorb them.

A pretrained LM's activations carry a few channels 10-100× larger than the rest (worst at the
MLP's down_proj input). Integer kernels that quantize activations per block of 32 channels
(MatMulNBits, accuracy level 4) then give the other 31 channels of an outlier's block almost
no resolution. For a MatMul `y = x·W` whose input channel k is produced by a per-channel
scale the graph already applies, dividing that scale by s_k and multiplying W's row k by s_k
computes the same y (exactly, up to float rounding) with the outlier shrunk:

- x = RMSNorm(h) · γ  (q/k/v and gate/up after a norm): γ_k / s_k;
- x = act(gate) · up  (down_proj): up_proj's output column k / s_k (up is linear in its weight).

s_k = max|x_k|^α / max|W_k|^(1-α) (SmoothQuant, Xiao et al. 2023; α = 0.5 balances the two),
with max|x_k| measured on the calibration feeds. Written by hand: onnxruntime's quantization
tools offer SmoothQuant only through Intel Neural Compressor, for QDQ static quantization, not
for the weight-only MatMulNBits graphs used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

ALPHA = 0.5


@dataclass(frozen=True)
class Smoothing:
    """One migration: MatMuls reading `activation`, whose channel scale lives in `scale_source`."""

    activation: str
    matmuls: tuple[str, ...]  # weight initializer names of the MatMuls reading it
    scale_source: str  # initializer whose entries (γ) or columns (up_proj) produce the channels
    columns: tuple[int, int] | None  # for a column range of a (fused) weight: [start, stop)


def smoothable(model: onnx.ModelProto) -> list[Smoothing]:
    """The activations of `model` whose channel scale can be migrated, as described above."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "Shape":  # reads no values: a rescaled activation keeps its shape
            continue
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for activation, nodes in readers.items():
        if not nodes or any(n.op_type != "MatMul" or n.input[0] != activation or n.input[1] not in inits for n in nodes):
            continue
        source = _channel_scale(producers.get(activation), producers, inits, readers)
        if source is not None:
            found.append(Smoothing(activation, tuple(n.input[1] for n in nodes), *source))
    return found


def _channel_scale(node, producers, inits, readers) -> tuple[str, tuple[int, int] | None] | None:
    """Where `node`'s (a Mul's) per-channel scale can be changed without changing anything else."""
    if node is None or node.op_type != "Mul":
        return None
    for i, name in enumerate(node.input):
        other = node.input[1 - i]
        if name in inits and len(inits[name].dims) == 1 and len(readers.get(name, [])) == 1:
            return name, None  # γ of a norm, read by this Mul alone
        up = producers.get(name)
        if name not in inits and up is not None and other not in inits:
            columns = _up_columns(up, name, producers, inits, readers)
            if columns is not None:
                return columns
    return None


def _up_columns(node, output, producers, inits, readers) -> tuple[str, tuple[int, int] | None] | None:
    """up_proj's weight (or its column range in a fused gate+up weight) that produces `output`."""
    if node.op_type == "MatMul" and node.input[1] in inits and len(readers[node.input[1]]) == 1 and len(readers[output]) == 1:
        return node.input[1], None
    if node.op_type != "Split" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    matmul = producers.get(node.input[0])
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits or len(readers[node.input[0]]) != 1:
        return None
    # The export splits fused weights' outputs along the last axis (-1, exporter/fuse.py); any
    # other axis would split tokens, not channels. The fused weight must have no other reader.
    if axis != -1 or len(readers[output]) != 1 or len(readers[matmul.input[1]]) != 1:
        return None
    sizes = numpy_helper.to_array(inits[node.input[1]]).tolist()
    index = list(node.output).index(output)
    start = int(sum(sizes[:index]))
    return matmul.input[1], (start, start + int(sizes[index]))


def smooth(model: onnx.ModelProto, peaks: dict[str, np.ndarray], alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """Migrate the outliers of every smoothable activation with a measured per-channel peak
    (`peaks[activation]` = max |x| per input channel) into its MatMuls' weights, in place.
    Returns each smoothed activation's factors (its channel k is now x_k / factor[k])."""
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, np.ndarray] = {}
    for item in smoothable(model):
        peak = peaks.get(item.activation)
        if peak is None:
            continue
        weights = {name: numpy_helper.to_array(inits[name]) for name in item.matmuls}
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        factor = np.power(np.maximum(peak, 1e-5), alpha) / np.power(np.maximum(weight_peak, 1e-5), 1 - alpha)
        factor = np.clip(factor, 1e-2, 1e2).astype(np.float32)  # a channel that never fired stays near as it was
        for name, weight in weights.items():
            _replace(inits[name], weight * factor[:, None])
        source = numpy_helper.to_array(inits[item.scale_source]).copy()
        if item.columns is None and source.ndim == 1:
            source = source / factor
        else:
            start, stop = item.columns or (0, source.shape[-1])
            source[..., start:stop] = source[..., start:stop] / factor
        _replace(inits[item.scale_source], source)
        done[item.activation] = factor
    return done


def _replace(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))


def activation_peaks(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor in `names`, over `feeds` (feeds.probe)."""
    from vlmexport.quantize.feeds import probe

    peaks: dict[str, np.ndarray] = {}
    for values in probe(model, feeds, names):
        for name, value in zip(names, values, strict=True):
            if value.size:
                channel = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                peaks[name] = np.maximum(peaks[name], channel) if name in peaks else channel
    return peaks
