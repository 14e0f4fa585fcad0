"""GPTQ: round each weight matrix to its MatMulNBits grid so that, on real inputs, the
rounding errors cancel instead of adding up (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

For `y = x·W` (W: K inputs × N outputs) and the calibration inputs' Hessian H = Σ xᵀx,
GPTQ rounds W's rows (input channels) one at a time, each to the grid, and moves the
rounding error of row k onto the rows not yet rounded along H⁻¹ — the least-squares
correction that keeps ‖x·(Ŵ − W)‖ small on inputs like the calibration ones. The grid is
exactly the one onnxruntime's MatMulNBits quantizer writes (MLAS' blockwise rule: blocks of
`block_size` rows per column; symmetric: scale = the block's largest-magnitude value / −2^(b−1),
codes offset by 2^(b−1); with zero points: the block's range with 0 in it over 2^b − 1 steps),
and only the codes differ: the same kernels, bytes and portability proof (with H = I the codes
and scales are onnxruntime's own, tested).

Measured on the captioner preset's int8 decoder (32 calibration images, other than the 32
judged; decoder alone on fp32's prefixes): the output error ‖x·(Ŵ − W)‖² relative to
‖x·W‖² fell from 2.6e-5 (round to nearest) to 1.6e-6, and the teacher-forced mean KL from
0.0295 to 0.0081 (no position over 1 nat; shipped int8 0.0265).

Written by hand because onnxruntime's own GPTQ (`GPTQWeightOnlyQuantConfig`, ported from
Intel Neural Compressor, onnxruntime.quantization.neural_compressor.weight_only.gptq) moves
each error along a column of the *upper* Cholesky factor of H⁻¹ below its diagonal — zeros —
so it compensates nothing: its result equals round-to-nearest's exactly (measured on a random
correlated H), and it stores 8-bit results as float weights rather than MatMulNBits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlmexport.quantize.shared import private_weights

DAMPING = 0.01  # × the mean of H's diagonal, added to it (the paper's default): H stays invertible
CLIP_SHRINKS = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 down to 0.7
# Speed only (the same codes: byte for byte on the real-weights int8): rows whose updates to the rest
# of the weight are batched into one matrix product, and, inside them, runs of rows whose updates
# to the rest of the batch are (a row's outer product then updates SUB_ROWS / 2 rows on average,
# not LAZY_ROWS / 2). With each block's extremes found once, not once per clip shrink: the
# real-weights int8's rounding 93 → 64 s (AMD EPYC, AVX2; a third of it factoring Hessians).
LAZY_ROWS = 128
SUB_ROWS = 16


@dataclass(frozen=True)
class Rounded:
    """A K × N weight on the MatMulNBits grid: codes [K, N], and per block of rows × column the
    scale [K/block, N] and (with zero points) the zero point [K/block, N]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    def values(self) -> np.ndarray:
        """The weight the kernel computes with, float64 [K, N]."""
        k, n = self.codes.shape
        middle = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 2 ** (self.bits - 1))
        blocks = self.codes.reshape(k // self.block_size, self.block_size, n).astype(np.float64) - middle[:, None, :]
        return (blocks * self.scales[:, None, :]).reshape(k, n)


class HessianSums:
    """Σ w xᵀx (float64, [K, K]) of each tensor in `names`, summed as runs hand over their values
    (rows: every position of every run, each of weight w, 1 unless the run gives `weights`) — a
    feeds.Probe's sink."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.sums: dict[str, np.ndarray] = {}

    def __call__(self, values: list[np.ndarray], weights: np.ndarray | None = None) -> None:
        """`weights`: one per position of the run. A value with fewer positions (a graph that
        keeps only the last ones, as a head computing only the logits it returns) takes the last."""
        for name, value in zip(self.names, values, strict=True):
            if weights is not None:
                positions = value.shape[-2]
                if positions > len(weights):
                    raise ValueError(f"{name}: {positions} positions, {len(weights)} weights")
                # Each row times √w, so that its xᵀx counts w times.
                value = value * np.sqrt(weights[len(weights) - positions :]).astype(np.float32)[:, None]
            # One run's product in float32 (a few hundred rows: relative error ~1e-6, and twice
            # float64's speed), the sum over runs in float64. Products over more rows at a time
            # ran BLAS faster (1024 rows: 25 s less on the real-weights int8) but round
            # differently, and GPTQ's codes follow: 0.2 % of them changed, and with them which of
            # the 96-image fidelity set's knife edges tip (int8 0.0185 → 0.0231, 7 → 14
            # positions over 1 nat; median and text KL slightly lower) — kept per run, so the
            # variants and the README's tables stay what they were.
            rows = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            product = (rows.T @ rows).astype(np.float64)
            if name in self.sums:
                self.sums[name] += product
            else:
                self.sums[name] = product


def rescaled(hessians: Mapping[str, np.ndarray], factors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Hessians after outlier migration divided each activation's channel k by factors[k]
    (smooth.py): x' = x / f, so H' = H / (f fᵀ)."""
    out = dict(hessians)
    for name, factor in factors.items():
        if name in out:
            f = factor.astype(np.float64)
            out[name] = out[name] / np.outer(f, f)
    return out


def round_weight(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    symmetric: bool,
    block_size: int,
    act_order: bool = False,
    clip: bool = False,
    scale_bits: int | None = None,
) -> Rounded:
    """`weight` [K, N] (K a multiple of `block_size`) rounded by GPTQ against `hessian` [K, K].
    With H = I (and neither option) no error moves and this is round-to-nearest, code for code.

    `act_order`: rows in order of falling H diagonal (the inputs that carry the most energy
    first, while the most rows are left to take their error; the paper's "act-order"); each
    block's scale is then fixed up front from the weights as given ("static groups"), since
    MatMulNBits' blocks are runs of rows in storage order. `clip`: each block's range is the one
    of CLIP_SHRINKS × its extremes that rounds the block with the least H-diagonal-weighted error.
    `scale_bits`: each scale rounded to that many significant bits (11: float16's) before any
    code is chosen against it, so a scale stored in float16 is the one the codes were rounded for.
    """
    w = weight.astype(np.float64).copy()
    k, n = w.shape
    h = hessian.astype(np.float64).copy()
    # A channel that never fired: nothing to compensate against; its row is rounded to nearest
    # (the reference implementation zeroes it, which would lose it should it fire in use).
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += DAMPING * np.mean(np.diag(h))
    energy = np.diag(h).copy()
    order = np.argsort(-energy, kind="stable") if act_order else np.arange(k)
    w, h = w[order], h[np.ix_(order, order)]
    upper = inverse_factor(h)
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((k // block_size, n))
    zeros = np.zeros((k // block_size, n))
    top = 2**bits - 1
    if act_order:  # static groups: every block's grid from the weights before any update
        blocks = weight.astype(np.float64).reshape(k // block_size, block_size, n)
        scales, zeros = _grid(blocks, bits, symmetric, energy.reshape(k // block_size, block_size) if clip else None, scale_bits)
    lazy = block_size * max(1, LAZY_ROWS // block_size)  # whole blocks, so a block's scale sees its rows
    sub = math.gcd(SUB_ROWS, block_size)  # runs that never straddle a block's first row
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        part = w[start:stop].copy()
        errors = np.zeros_like(part)
        for first in range(0, stop - start, sub):
            last = min(first + sub, stop - start)
            for i in range(first, last):
                row = start + i
                if not act_order and row % block_size == 0:  # the block's scale from its rows as they now stand
                    b = row // block_size
                    scales[b], zeros[b] = _grid(part[i : i + block_size], bits, symmetric, energy[row : row + block_size] if clip else None, scale_bits)
                b = order[row] // block_size
                scale, zero = scales[b], zeros[b]
                code = np.clip(np.round(part[i] / np.where(scale == 0, 1.0, scale)) + zero, 0, top)
                codes[order[row]] = code
                error = (part[i] - (code - zero) * scale) / upper[row, row]
                part[i:last] -= np.outer(upper[row, row : start + last], error)
                errors[i] = error
            part[last:] -= upper[start + first : start + last, start + last : stop].T @ errors[first:last]
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return Rounded(codes, scales, None if symmetric else zeros.astype(np.uint8), bits, block_size)


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row j of it holds the updates after
    rounding row j (GPTQ §3). With J the order-reversing permutation and JHJ = LLᵀ, H = (JLJ)(JLJ)ᵀ
    with JLJ upper triangular, so U = (JLJ)⁻¹: one Cholesky and one triangular inverse, a third of
    the work of inverting H and factoring the inverse. torch: numpy has no triangular solve."""
    import torch

    lower = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(hessian[::-1, ::-1])))
    flipped = lower.flip(0, 1)
    identity = torch.eye(len(hessian), dtype=flipped.dtype)
    return torch.linalg.solve_triangular(flipped, identity, upper=True).numpy()


def _grid(
    block: np.ndarray, bits: int, symmetric: bool, weights: np.ndarray | None = None, scale_bits: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `block` (rows × columns, or blocks × rows × columns), MLAS' scale and zero
    point (onnxruntime's MatMulNBits quantizer); given `weights` (one per row), the range shrunk
    by the CLIP_SHRINKS factor that rounds the column with the least weighted squared error;
    given `scale_bits`, each scale rounded to that many significant bits (round_significand)."""
    extremes = _extremes(block, symmetric)  # once: every shrink scales the same ones
    if weights is None:
        return _grid_at(extremes, bits, symmetric, 1.0, scale_bits)
    columns = block.shape[:-2] + block.shape[-1:]
    best_error, best_scale, best_zero = np.full(columns, np.inf), np.zeros(columns), np.zeros(columns)
    for shrink in CLIP_SHRINKS:
        scale, zero = _grid_at(extremes, bits, symmetric, shrink, scale_bits)
        step, middle = scale[..., None, :], zero[..., None, :]
        codes = np.clip(np.round(block / np.where(step == 0, 1.0, step)) + middle, 0, 2**bits - 1)
        error = np.einsum("...r,...rc->...c", weights, (block - (codes - middle) * step) ** 2)
        better = error < best_error
        best_error, best_scale, best_zero = np.where(better, error, best_error), np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale, best_zero


def round_significand(values: np.ndarray, bits: int | None) -> np.ndarray:
    """`values` rounded to `bits` significant bits (half to even; None: as they are). With 11,
    float16's, any power-of-two multiple of the result in float16's normal range is exactly a
    float16 (blockwise.store_scales_half stores scales so)."""
    if bits is None:
        return values
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def _extremes(block: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """Per column, what MLAS' grid is made from: symmetric, the value of largest magnitude (the
    first such, as MLAS scans); else the range's low and high ends, 0 in it."""
    if symmetric:
        at = np.abs(block).argmax(axis=-2)[..., None, :]
        return (np.take_along_axis(block, at, axis=-2)[..., 0, :],)
    return np.minimum(block.min(axis=-2), 0.0), np.maximum(block.max(axis=-2), 0.0)


def _grid_at(extremes: tuple[np.ndarray, ...], bits: int, symmetric: bool, shrink: float, scale_bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    if symmetric:
        peak = extremes[0] * shrink
        return round_significand(peak / -(2 ** (bits - 1)), scale_bits), np.full(peak.shape, 2 ** (bits - 1), np.float64)
    low, high = extremes[0] * shrink, extremes[1] * shrink
    scale = round_significand((high - low) / (2**bits - 1), scale_bits)  # 0 for an all-zero block, as onnxruntime stores it
    zero = np.clip(np.round(-low / np.where(scale == 0, 1.0, scale)), 0, 2**bits - 1)
    return scale, zero


def matmul_nbits(node: onnx.NodeProto, rounded: Rounded, accuracy_level: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node (and its initializers) computing `node` with `rounded` weights,
    laid out and named as onnxruntime's quantizer lays them out."""
    k, n = rounded.codes.shape
    blocks = k // rounded.block_size
    codes = np.ascontiguousarray(rounded.codes.T.reshape(n, blocks, rounded.block_size))
    weight = node.input[1]
    inits = [
        numpy_helper.from_array(_pack(codes, rounded.bits), f"{weight}_Q{rounded.bits}"),
        numpy_helper.from_array(np.ascontiguousarray(rounded.scales.T).astype(np.float32), f"{weight}_scales"),
    ]
    if rounded.zero_points is not None:
        zeros = np.ascontiguousarray(rounded.zero_points.T)
        if rounded.bits == 4:  # two a byte along the blocks, low nibble first; an odd one out pads with 8
            zeros = _pack(np.pad(zeros, ((0, 0), (0, blocks % 2)), constant_values=8)[:, None, :], 4)[:, 0, :]
        inits.append(numpy_helper.from_array(zeros, f"{weight}_zero_points"))
    inputs = [node.input[0], *(i.name for i in inits)]
    attrs = {"K": k, "N": n, "bits": rounded.bits, "block_size": rounded.block_size, "accuracy_level": accuracy_level}
    new = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{rounded.bits}", domain="com.microsoft", **attrs)
    return new, inits


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes along the last axis as MatMulNBits stores them: one a byte (8 bits), or two, low nibble first."""
    if bits == 8:
        return codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def replace_matmuls(
    model: onnx.ModelProto,
    hessians: Mapping[str, np.ndarray],
    grids: Mapping[str, tuple[int, bool]],
    block_size: int,
    accuracy_level: int,
    act_order: bool = False,
    clip: bool = False,
    scale_bits: int | None = None,
) -> list[str]:
    """Every MatMul named in `grids` (node name → bits, symmetric) whose weight is a constant of
    its own in whole blocks, and whose input has a Hessian, becomes a GPTQ-rounded MatMulNBits
    (`act_order`, `clip`, `scale_bits`: see round_weight), in place. Returns the names replaced; the others are
    left for round-to-nearest."""
    graph = model.graph
    weights = private_weights(model)
    done = []
    for node in list(graph.node):
        init = weights.get(node.name)
        if node.name not in grids or node.input[0] not in hessians or init is None or len(init.dims) != 2 or init.dims[0] % block_size:
            continue
        if hessians[node.input[0]].shape != (init.dims[0], init.dims[0]):
            continue  # a same-named tensor of another width (another graph's): not this node's inputs
        bits, symmetric = grids[node.name]
        rounded = round_weight(numpy_helper.to_array(init), hessians[node.input[0]], bits, symmetric, block_size, act_order, clip, scale_bits)
        new, new_inits = matmul_nbits(node, rounded, accuracy_level)
        graph.node.insert(list(graph.node).index(node), new)
        graph.node.remove(node)
        graph.initializer.remove(init)
        graph.initializer.extend(new_inits)
        done.append(node.name)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done
