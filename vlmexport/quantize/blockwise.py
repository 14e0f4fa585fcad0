"""Blockwise weight quantization: MatMulNBits (8 or 4 bits, blocks of 32 along the input axis)
via onnxruntime's MatMulNBitsQuantizer — the recipe of the int8, uint8 and q4 variants.

Why this and not `quantize_dynamic` (MatMulInteger), measured on the real-weights model
(`vlmexport synth --preset smollm2-135m-real`; numbers in the module docstring of
vlmexport.quantize):

- Activations: MatMulNBits at accuracy level 4 quantizes each activation row per block of 32
  channels, where dynamic quantization uses one scale for the whole tensor — a pretrained LM's
  outlier channels (10³× the median at some down_proj inputs) leave the rest of a per-tensor
  range no resolution. With the outliers also migrated into the weights (smooth.py), 8-bit
  blocks reach mean KL 0.006 where dynamic int8 gives 0.88.
- Portability: its x86 AVX2 kernels (no VNNI) multiply u8 activations' |a| ≤ 127 by weights
  whose pair sums cannot reach int16's limit (4-bit codes ≤ 15; 8-bit codes masked so each
  VPMADDUBSW pair has one zero term: 255·128 < 32767), then widen to int32 — proven in
  validate/portable.py, and observed under `qemu-x86_64 -cpu Haswell` in the tests. U8S8
  MatMulInteger with full-range int8 weights saturates there (results off by up to 2×).
- onnxruntime-web runs MatMulNBits (8 and 4 bits) and GatherBlockQuantized; it computes them
  in float32 (it ignores accuracy level 4), so web outputs sit ~1 % (relative) closer to fp32
  than native ones — the web comparison allows for that.

The tied table: the head's MatMulNBits stores E (vocab × embed) as `bits`-bit blocks of
`block_size` along the embedding axis, row by row — exactly the layout GatherBlockQuantized
reads (uint8 data, `bits`, zero point 2^(bits-1) when symmetric). So the embedding Gather becomes
a GatherBlockQuantized over a Reshape of the head's own weights and scales: one quantized table
for both reads. Excluding the head keeps the table float32, still stored once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from vlmexport.errors import BundleError
from vlmexport.exporter.onnx_io import SHARED_SUFFIX
from vlmexport.quantize import gptq, shared
from vlmexport.quantize.integer import quiet_root_logger


@dataclass(frozen=True)
class BlockwiseRecipe:
    """What MatMulNBits does to one variant (values chosen by measurement, see the module docstring)."""

    bits: int
    symmetric: bool  # False: uint8/uint4 codes with a zero point per block
    block_size: int = 32
    accuracy_level: int = 4  # int8 compute of the activations where the runtime has such kernels
    # fnmatch patterns of MatMul nodes given 8 bits in a 4-bit recipe (mixed precision).
    high_bits: tuple[str, ...] = field(default_factory=tuple)
    # Their block size (None: block_size): an 8-bit block's scale costs as many bytes as a 4-bit
    # block's, for a sixteenth of the rounding error.
    high_block_size: int | None = None
    # "rtn" rounds each block to its nearest codes; "gptq" rounds the MatMuls it is given Hessians
    # for so their errors cancel on calibration inputs (gptq.py; same grid, same kernels), the
    # rest as rtn; "hqq" (onnxruntime's HQQ config: zero points and scales optimised per block,
    # half-quadratic, no calibration data; needs torch) for bits < 8.
    algorithm: str = "rtn"
    # With "gptq": rows in order of falling input energy, and each block's range shrunk to the one
    # that rounds it with the least error (gptq.round_weight's act_order and clip).
    act_order: bool = False
    clip: bool = False
    smooth_alpha: float | None = 0.4  # outlier migration in decoder graphs (smooth.py); None: none
    # With "gptq", in a decoder's Hessians: the weight of each image-prefix position against each
    # caption token's and prose row's 1 (feeds.calibrate).
    prefix_weight: float = 1.0
    # fnmatch patterns of MatMul nodes the recipe itself keeps float32 (beside --exclude-nodes).
    keep_fp32: tuple[str, ...] = field(default_factory=tuple)
    # How the weights of those nodes are stored: "float16" (cast to float32 at load: computed in
    # float32, half the bytes) or "float32".
    kept_storage: Literal["float32", "float16"] = "float32"
    # How MatMulNBits' scales are stored: "float16" (each tensor times a power of two, cast back to
    # float32 and scaled at load; GPTQ rounds its codes against the float16 scales; store_scales_half)
    # or "float32", as onnxruntime's quantizer writes them.
    scale_storage: Literal["float32", "float16"] = "float32"
    # fnmatch patterns of MatMul nodes whose 8-bit codes are computed in float32: stored as the
    # others are, dequantized at each run and multiplied by a float32 MatMul (matmul_in_float):
    # no activation rounding, at about float32's speed.
    float_compute: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        stored = " (stored float16)" if self.kept_storage == "float16" else ""
        kept = f"; float32{stored}: {', '.join(self.keep_fp32)}" if self.keep_fp32 else ""
        if self.algorithm == "hqq":
            return f"{self.bits}-bit HQQ (zero points), blocks of {self.block_size}, float compute; 8-bit: {', '.join(self.high_bits) or 'none'}{kept}"
        kind = "symmetric" if self.symmetric else "asymmetric (zero points)"
        options = [name for name, on in (("act-order", self.act_order), ("clipped ranges", self.clip)) if on]
        rounding = f", rounded by GPTQ{' (' + ', '.join(options) + ')' if options else ''} on calibration images" if self.algorithm == "gptq" else ""
        high_blocks = f" in blocks of {self.high_block_size}" if self.high_block_size and self.high_block_size != self.block_size else ""
        high = f"; 8-bit{high_blocks}: {', '.join(self.high_bits)}" if self.high_bits and self.bits < 8 else ""
        which = "every MatMul" if self.float_compute == ("*",) else ", ".join(self.float_compute)
        computed = f"; computed in float32 (8-bit codes dequantized each run): {which}" if self.float_compute else ""
        return f"{self.bits}-bit {kind}, blocks of {self.block_size}, accuracy_level {self.accuracy_level}{rounding}{high}{kept}{computed}"


def quantize_blockwise(
    model: onnx.ModelProto,
    recipe: BlockwiseRecipe,
    exclude: list[str],
    high_nodes: list[str] | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`model` with every constant-weight MatMul as MatMulNBits, the tied table shared.

    `exclude` are node names kept float32 (so are those matching the recipe's `keep_fp32`);
    `high_nodes` (plus the recipe's `high_bits` patterns) get 8 bits where the recipe has fewer.
    `hessians` (activation name → Σ xᵀx of the MatMuls reading it, gptq.hessians) is what a
    "gptq" recipe rounds against; without them every node is rounded to nearest.
    """
    kept = {n.name for n in model.graph.node if n.op_type == "MatMul" and any(fnmatch.fnmatchcase(n.name, p) for p in recipe.keep_fp32)}
    exclude = sorted(set(exclude) | kept)
    found = shared.shared_tables(model)
    tables = [t for t in found if not any(n in exclude for n in (*t.gather_nodes, *t.matmul_nodes))]
    if tables:
        shared.unshare(model)  # tables whose head is excluded are stored once again below
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in exclude]
    high = sorted({n for n in matmuls if n in (high_nodes or []) or any(fnmatch.fnmatchcase(n, p) for p in recipe.high_bits)})
    if recipe.bits >= 8:
        high = []
    high_block = recipe.high_block_size or recipe.block_size
    rounded: list[str] = []
    if recipe.algorithm == "gptq" and hessians:
        # A tied head is rounded to nearest: GatherBlockQuantized reads its codes as the
        # embeddings, whose error H (the head's inputs) says nothing about.
        heads = {name for table in tables for name in table.matmul_nodes}
        scale_bits = FLOAT16_SIGNIFICAND if recipe.scale_storage == "float16" else None
        low = [name for name in matmuls if name not in high]
        for names, block, grid in ((high, high_block, (8, True)), (low, recipe.block_size, (recipe.bits, recipe.symmetric))):
            grids = {name: grid for name in names if name not in heads}
            rounded += gptq.replace_matmuls(model, hessians, grids, block, recipe.accuracy_level, recipe.act_order, recipe.clip, scale_bits)
    if high:
        model = _nbits(model, BlockwiseRecipe(8, True, high_block, recipe.accuracy_level), 8, exclude, include=[n for n in high if n not in rounded])
    model = _nbits(model, recipe, recipe.bits, exclude, include=None)
    shared_ok = [_gather_from_head(model, table) for table in tables]
    shared.store_shared_weights_once(model)  # an excluded head's float table: once again
    halved = _store_half(model, kept) if recipe.kept_storage == "float16" else []
    half_scales = store_scales_half(model) if recipe.scale_storage == "float16" else []
    in_float = matmul_in_float(model, recipe.float_compute)
    described = recipe if rounded or recipe.algorithm != "gptq" else dataclasses.replace(recipe, algorithm="rtn")
    record = {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer" + (f" (GPTQ's codes for {len(rounded)} nodes: vlmexport.quantize.gptq)" if rounded else ""),
        "weights": described.describe(),
        "activations": _activations_note(model, in_float),
        "float_computed_nodes": in_float,
        "tied_table": _table_note(found, tables, shared_ok, recipe),
        "excluded_nodes": len(exclude),
        "excluded": sorted(exclude),
        "eight_bit_nodes": high,
        "float16_stored_nodes": halved,
        "scales": (
            f"float16 for {len(half_scales)} MatMulNBits (a power of two per tensor, cast to float32 at load): {FOLDING_NEEDED}"
            if recipe.scale_storage == "float16"
            else "float32"
        ),
    }
    return model, record


def _activations_note(model: onnx.ModelProto, in_float: list[str]) -> str:
    kernel = "int8 per block inside the kernel (accuracy_level 4)"
    if not in_float:
        return f"float32 in and out; {kernel}"
    if not any(n.op_type == "MatMulNBits" for n in model.graph.node):
        return f"float32 throughout: every quantized MatMul ({len(in_float)}) computed in float"
    return f"float32 in and out; {kernel}; float32 throughout in the {len(in_float)} MatMuls computed in float"


def _store_half(model: onnx.ModelProto, nodes: set[str]) -> list[str]:
    """Store the float32 weight matrices of `nodes` (MatMuls the recipe keeps float) as float16,
    each behind a Cast back to float32: computed in float32 as before, stored in half the bytes.

    Why: the variant's size target leaves no room for float32 weights (int8: 0.30 × fp32), and
    float16's rounding of a weight (2^-11 relative) is far below int8 activations' error.
    onnxruntime folds a Cast of an initializer into a float32 constant when the session starts
    (so does onnxruntime-web), so no run pays for it. Returns the nodes whose weights moved.
    """
    weights = shared.private_weights(model)
    halved = []
    for node in list(model.graph.node):
        init = weights.get(node.name)
        if node.name not in nodes or init is None or init.data_type != onnx.TensorProto.FLOAT:
            continue  # not a constant of its own (a shared table stays as it is)
        values = numpy_helper.to_array(init)
        if np.abs(values).max() >= np.finfo(np.float16).max / 2:
            continue  # float16 cannot hold it (no such weight measured; outlier migration scales weights up)
        _as_float16(model.graph, init, values, 0)
        halved.append(node.name)
    return sorted(halved)


FLOAT16_SIGNIFICAND = 11  # float16's significant bits (10 stored, one implied)


# What a runtime must do for float16-stored scales, recorded in the manifest: onnxruntime 1.32's
# MatMulNBits at accuracy level 4 packs its scales with its weights when the session starts, and
# only if they are constants by then; scales that arrive at run time (the Cast and Mul not folded)
# make it return zeros — measured, 8 and 4 bits, with and without zero points, on AVX512-VNNI and
# under qemu's AVX2 model; tests/test_gptq.py keeps the claim checked. Any optimization level but
# "disabled" folds them (onnxruntime's default is "all"; so is this project's, and its web class's).
FOLDING_NEEDED = "needs onnxruntime's constant folding (any graph optimization level but disabled: unfolded, its MatMulNBits return zeros)"


def store_scales_half(model: onnx.ModelProto) -> list[str]:
    """Store every MatMulNBits' float32 scales as float16 times a power of two (one per tensor,
    so the largest lands near 2^14), behind a Cast and a Mul back: half the scales' bytes —
    at 4 bits in blocks of 32 a fifth of the weights' bytes, at 8 bits a ninth.

    Exact for scales of FLOAT16_SIGNIFICAND significant bits (GPTQ chooses its codes against
    such scales): the power of two moves them into float16's normal range, the Mul back is exact
    in float32. Scales rounded to nearest by onnxruntime's quantizer (a tied head) move by at
    most 2^-12 of themselves: at 8 bits a weight by at most 128 · 2^-12 of a step, a sixteenth of
    its rounding's worst. A tensor whose scales span more than float16's normal range (2^30)
    stays float32. onnxruntime (and onnxruntime-web) fold the Cast and the Mul into float32
    constants when the session starts — and must: see FOLDING_NEEDED. Returns the nodes
    whose scales moved.
    """
    inits = {i.name: i for i in model.graph.initializer}
    halved = []
    for node in list(model.graph.node):
        init = inits.get(node.input[2]) if node.op_type == "MatMulNBits" else None
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            continue  # no scales of its own, or already stored
        values = numpy_helper.to_array(init)
        magnitudes = np.abs(values[values != 0])
        if magnitudes.size == 0:
            continue
        exponent = 14 - int(np.ceil(np.log2(magnitudes.max())))
        if magnitudes.min() * 2.0**exponent < np.finfo(np.float16).smallest_normal:
            continue
        _as_float16(model.graph, init, values, exponent)
        halved.append(node.name)
    return sorted(halved)


def _as_float16(graph: onnx.GraphProto, init: onnx.TensorProto, values: np.ndarray, exponent: int) -> None:
    """Replace float32 initializer `init` (`values`) by float16 `values` × 2^`exponent` behind a
    Cast (and a Mul by 2^-`exponent`) that gives back a float32 tensor of its name."""
    name = init.name
    graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array((values * 2.0**exponent).astype(np.float16), f"{name}_float16"))
    cast = f"{name}_cast" if exponent else name
    nodes = [helper.make_node("Cast", [f"{name}_float16"], [cast], name=f"{name}_to_float32", to=onnx.TensorProto.FLOAT)]
    if exponent:
        graph.initializer.append(numpy_helper.from_array(np.array(2.0**-exponent, np.float32), f"{name}_unscale"))
        nodes.append(helper.make_node("Mul", [cast, f"{name}_unscale"], [name], name=f"{name}_unscaled"))
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)


def matmul_in_float(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """Replace each 8-bit MatMulNBits whose MatMul name matches `patterns` by a MatMul of a
    float32 weight that a DequantizeLinear (blocks along K, opset 21) makes from the same codes,
    zero points and scales at run time: (code − zero point) · scale. Returns the MatMuls so
    replaced.

    Why: MatMulNBits at accuracy level 4 rounds each activation block to 8 bits, and its level-1
    (float) kernel for 8 bits takes 1.6× fp32's time on the real-weights vision encoder (AMD
    EPYC AVX512-VNNI). Standard ops of constants (Cast, Sub, Mul) would be folded into float32
    weights when the session starts — fp32's speed, but more memory than fp32 itself (the
    folding's float32 copies stay in onnxruntime's arena: the real-weights int8 bundle held
    1.46 GB after a caption against fp32's 1.13 GB). onnxruntime never folds DequantizeLinear (it
    keeps QDQ groups whole) and fuses a DequantizeLinear that feeds a MatMul directly into a
    level-4 MatMulNBits — so a Reshape to the weight's own shape sits between them: each run
    expands the weights into transient buffers (about 1 ms for a 768×3072 weight, beside 6 ms
    for its product at 196 rows) and multiplies in float32. A runtime that folds them computes
    the same values in more memory; one that fused them would compute the level-4 kernel's.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    replaced, stale = [], set()
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        matmul = node.name.rsplit("_Q", 1)[0]
        if not any(fnmatch.fnmatchcase(matmul, p) for p in patterns):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        a, codes, scales = node.input[:3]
        zero = node.input[3] if len(node.input) > 3 else ""
        if int(attrs["bits"]) != 8 or any(node.input[4:]) or codes not in inits or zero and zero not in inits or opset < 21:
            raise BundleError(
                f"{node.name}: only 8-bit MatMulNBits with constant codes, no g_idx or bias, in an opset-21+ graph compute in float here",
                "drop it from float_compute",
            )
        blocks, p = -(-k // block), node.name
        # MatMulNBits stores codes [N, blocks, block] (K padded to whole blocks); DequantizeLinear
        # takes them [K, N], a scale and zero point per block of K rows and column.
        laid = numpy_helper.to_array(inits[codes]).reshape(n, blocks, block).transpose(1, 2, 0).reshape(blocks * block, n)[:k]
        if zero:
            zeros = numpy_helper.to_array(inits[zero]).reshape(n, blocks).T
        else:  # symmetric: MatMulNBits' zero point is 2^(bits-1); signed codes need none
            laid, zeros = (laid.astype(np.int16) - 2**7).astype(np.int8), None
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(laid), f"{p}_codes"),
            numpy_helper.from_array(np.array([n, blocks], np.int64), f"{p}_scales_nb"),
            numpy_helper.from_array(np.array([k, n], np.int64), f"{p}_shape"),
        ])  # fmt: skip
        dequantize = [f"{p}_codes", f"{p}_scales_bn"]
        if zeros is not None:
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(zeros), f"{p}_zero"))
            dequantize.append(f"{p}_zero")
        nodes = [
            helper.make_node("Reshape", [scales, f"{p}_scales_nb"], [f"{p}_scales_2d"], name=f"{p}_scales_2d"),
            helper.make_node("Transpose", [f"{p}_scales_2d"], [f"{p}_scales_bn"], name=f"{p}_scales_bn", perm=[1, 0]),
            helper.make_node("DequantizeLinear", dequantize, [f"{p}_w"], name=f"{p}_w", axis=0, block_size=block),
            helper.make_node("Reshape", [f"{p}_w", f"{p}_shape"], [f"{p}_w_unfused"], name=f"{p}_w_unfused"),
            helper.make_node("MatMul", [a, f"{p}_w_unfused"], list(node.output), name=matmul),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(nodes):
            graph.node.insert(at + offset, new)
        replaced.append(matmul)
        stale.update({codes, zero} - {""})
    used = {name for node in graph.node for name in node.input}
    for name in stale - used:  # the MatMulNBits layouts, unless another node (a tied Gather) reads them
        graph.initializer.remove(inits[name])
    return sorted(replaced)


PROBE = "embedding_table_probe"


def quantize_embedding_table(model: onnx.ModelProto, recipe: BlockwiseRecipe) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A graph that only looks rows up (transformers.js' embed_tokens) with its table as
    8-bit blocks read by GatherBlockQuantized — the tied table's format in the decoders.

    onnxruntime's quantizer turns a Gather into GatherBlockQuantized at 4 bits only, and 4 bits
    is what the decoders' tied table is spared even in q4 (the head stays at 8). So the table is
    given a probe head (Transpose + MatMul, the exporter's tied form), quantized by
    `quantize_blockwise` exactly as a tied table, and the probe is removed: the Gather keeps
    the head's quantized weights, nothing else reads them.
    """
    graph = model.graph
    tables = {i.name: i for i in graph.initializer if len(i.dims) == 2}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]
    for i, table in enumerate(sorted({n.input[0] for n in gathers})):
        transposed = f"{table}{SHARED_SUFFIX}_out"
        graph.node.append(helper.make_node("Transpose", [table], [transposed], name=f"{PROBE}_{i}{SHARED_SUFFIX}", perm=[1, 0]))
        graph.node.append(helper.make_node("MatMul", [f"{PROBE}_{i}_in", transposed], [f"{PROBE}_{i}_out"], name=f"{PROBE}_{i}/MatMul"))
    symmetric = recipe.symmetric if recipe.bits == 8 else True
    model, record = quantize_blockwise(model, BlockwiseRecipe(8, symmetric, recipe.block_size, recipe.accuracy_level, smooth_alpha=None), [])
    probes = [n for n in model.graph.node if n.name.startswith(PROBE)]
    for node in probes:
        model.graph.node.remove(node)
    # A table whose width is not whole blocks keeps its float Gather: drop the probe's weights then.
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    _dequantize_with_standard_ops(model)
    record["weights"] = f"embedding table only: {record['weights']} (Gather of the codes, then Sub/Mul by the block's zero point and scale)"
    return model, record


def _dequantize_with_standard_ops(model: onnx.ModelProto) -> None:
    """Replace each 8-bit GatherBlockQuantized by standard ops computing the same rows:
    Gather codes, scales (and zero points) → (code - zero point) · scale per block of the row.

    Why: transformers.js' browser build (onnxruntime-web 1.31.0-dev, its webgpu bundle) has no
    GatherBlockQuantized kernel — a session with one fails to start in Chromium (measured) — and
    embed_tokens runs there once per generated token.
    """
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "GatherBlockQuantized"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        data, ids, scales, *zero = node.input
        block, out, p = int(attrs["block_size"]), node.output[0], node.name
        # The codes' view is [vocab, width] (8 bits: one byte a value), whole blocks (_gather_from_head).
        width = int(numpy_helper.to_array(next(i for i in graph.initializer if i.name == _reshape_shape(graph, data)))[-1])
        if int(attrs["bits"]) != 8 or width % block:
            raise BundleError(f"{p}: not whole 8-bit blocks ({attrs['bits']} bits, width {width})", "report this as a vlmexport bug")
        blocks = width // block
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), f"{p}_blocked"),
            numpy_helper.from_array(np.array([0, 0, blocks * block], np.int64), f"{p}_rows"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last"),
            numpy_helper.from_array(np.array(128, np.float32), f"{p}_middle"),
        ])  # fmt: skip
        nodes = [
            helper.make_node("Gather", [data, ids], [f"{p}_codes"], name=f"{p}_codes"),
            helper.make_node("Cast", [f"{p}_codes"], [f"{p}_codes_f"], name=f"{p}_codes_f", to=onnx.TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}_codes_f", f"{p}_blocked"], [f"{p}_codes_b"], name=f"{p}_codes_b"),
            helper.make_node("Gather", [scales, ids], [f"{p}_scales"], name=f"{p}_scales"),
            helper.make_node("Unsqueeze", [f"{p}_scales", f"{p}_last"], [f"{p}_scales_b"], name=f"{p}_scales_b"),
        ]
        if zero and zero[0]:  # zero points per block (uint8 codes)
            nodes += [
                helper.make_node("Gather", [zero[0], ids], [f"{p}_zero"], name=f"{p}_zero"),
                helper.make_node("Cast", [f"{p}_zero"], [f"{p}_zero_f"], name=f"{p}_zero_f", to=onnx.TensorProto.FLOAT),
                helper.make_node("Unsqueeze", [f"{p}_zero_f", f"{p}_last"], [f"{p}_zero_b"], name=f"{p}_zero_b"),
            ]
            middle = f"{p}_zero_b"
        else:  # symmetric: the codes are stored offset by 2^(bits-1)
            middle = f"{p}_middle"
        nodes += [
            helper.make_node("Sub", [f"{p}_codes_b", middle], [f"{p}_centred"], name=f"{p}_centred"),
            helper.make_node("Mul", [f"{p}_centred", f"{p}_scales_b"], [f"{p}_values"], name=f"{p}_values"),
            helper.make_node("Reshape", [f"{p}_values", f"{p}_rows"], [out], name=f"{p}_out"),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(nodes):
            graph.node.insert(at + offset, new)


def _reshape_shape(graph: onnx.GraphProto, view: str) -> str:
    """The shape initializer of the Reshape that produces `view`."""
    return next(n.input[1] for n in graph.node if n.op_type == "Reshape" and n.output[0] == view)


def _nbits(model: onnx.ModelProto, recipe: BlockwiseRecipe, bits: int, exclude: list[str], include: list[str] | None) -> onnx.ModelProto:
    if include is not None:
        # The quantizer's nodes_to_include adds to op_types_to_quantize rather than restricting
        # it: restrict by excluding every other MatMul.
        exclude = list(exclude) + [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    if recipe.algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        config = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
    else:
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level,
            nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",),
        )  # fmt: skip
    with quiet_root_logger():
        quantizer.process()
    return quantizer.model.model


def _gather_from_head(model: onnx.ModelProto, table: shared.SharedTable) -> bool:
    """Point the table's Gathers at the head's quantized weights; False if they cannot share them."""
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(table.transposed)), None)
    if head is None:
        return False  # not quantized (excluded by the quantizer itself): the float table stays
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, embed, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
    if embed % block:
        # The head's last block is padded, GatherBlockQuantized reads whole blocks: the Gather
        # keeps the float table (only tiny test models have such widths; real ones are multiples of 64).
        return False
    shapes = {"data": (head.input[1], [vocab, embed * bits // 8]), "scales": (head.input[2], [vocab, -1])}
    if len(head.input) > 3 and head.input[3]:
        # Zero points: packed per row like the data (4-bit: two per byte; 8-bit: one).
        shapes["zero_points"] = (head.input[3], [vocab, -1])
    views = {}
    for key, (source, shape) in shapes.items():
        name = f"{source}_as_gather_{key}"
        shape_name = f"{name}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
        graph.node.insert(0, helper.make_node("Reshape", [source, shape_name], [name], name=f"{name}_reshape"))
        views[key] = name
    rest = [views["scales"]] + ([views["zero_points"]] if "zero_points" in views else [])  # after the data and the indices
    for node in list(graph.node):
        if node.name in table.gather_nodes:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            replacement = helper.make_node(
                "GatherBlockQuantized", [views["data"], node.input[1], *rest], list(node.output),
                name=f"{node.name}_Q{bits}", domain="com.microsoft", bits=bits, block_size=block, gather_axis=axis, quantize_axis=1,
            )  # fmt: skip
            graph.node.insert(list(graph.node).index(node), replacement)
            graph.node.remove(node)
    if not any(table.source in n.input for n in graph.node):
        kept = [i for i in graph.initializer if i.name != table.source]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return True


def _table_note(found: list[shared.SharedTable], tables: list[shared.SharedTable], shared_ok: list[bool], recipe: BlockwiseRecipe) -> str:
    if not found:
        return "none"
    if not tables:
        return "fp32, stored once (head excluded)"
    if all(shared_ok):
        return "quantized like the head, one copy read by MatMulNBits and GatherBlockQuantized"
    return f"quantized head, fp32 Gather table (embed width not a multiple of {recipe.block_size})"
