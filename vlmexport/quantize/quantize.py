"""`quantize`: write an int8 / uint8 / fp16 / q4 variant of a bundle beside its fp32 graphs, then check it.

Each component's fp32 graph is read (never written), quantized by onnxruntime's tools
(blockwise.py, integer.py, fp16.py), staged in a hidden folder inside the bundle, and only then
moved into place together with the updated manifest: a run that fails leaves the bundle as
it was. A variant that is written but fails its parity check is kept, marked failed in the
manifest (`checks[variant].passed = false`), so it can be inspected and re-checked — a
runtime that honours the manifest never picks it, and `quantize --force` replaces it.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vlmexport.bundle.manifest import ALIASES, Manifest, decoder_graphs, read_manifest, variant_path, verify_files
from vlmexport.errors import BundleError, UsageError
from vlmexport.exporter.onnx_io import TWO_GB, signature
from vlmexport.quantize import fp16, gptq, integer, smooth
from vlmexport.quantize.blockwise import BlockwiseRecipe, quantize_blockwise, quantize_embedding_table
from vlmexport.quantize.feeds import CALIBRATION_TOKENS, Probe, calibrate, calibration_images
from vlmexport.quantize.optimize import optimize_graph
from vlmexport.runtime.bundle import RUN_ONCE

MODES = ("int8", "uint8", "fp16", "q4")
# What each mode is inside, chosen by measurement on the real-weights model (vlmexport.quantize's
# module docstring has the numbers). `recipe="dynamic"` keeps onnxruntime's quantize_dynamic
# (MatMulInteger) for int8/uint8, for runtimes without MatMulNBits.
# int8's remaining KL is mostly its 8-bit weights, the rest its int8 activations (accuracy level
# 4): at accuracy level 1 (activations float32) the dithered checkpoint measured 0.0127 against
# 0.0178 (32 images + text; 0.0032 on the grid build, whose weights sat on 8-bit grids),
# and onnxruntime 1.32 then computes 8-bit MatMulNBits without a fast kernel, 9× slower than fp32.
# The 8-bit variants keep float32 the nodes where int8 activations cost the real-weights model
# most for the fewest bytes, their weights stored float16 (blockwise._store_half: half the bytes,
# cast back at load). Chosen by `--keep-fp32 auto`'s ranking (each node quantized alone; 16 image
# prefixes + text, on the dithered checkpoint): layer 0's down_proj alone cost 0.040 of the 0.047
# all-quantized decoder KL, its gate/up 0.014, then layer 27's gate/up, layer 2's q/k/v and
# down_proj 0.004-0.006; the earlier list (projection, layers 0-1 attention, layer 1 down_proj:
# where the image prefix enters, chosen on the checkpoint's grid build) stays. Decoder-only mean KL
# on 32 other image prefixes: earlier list 0.035, + layer 0's MLP 0.032, + the next three 0.025
# (this recipe, 0.296 × fp32 bytes), + layers 1-2 gate/up 0.027 (0.300). A few knife-edge
# positions (2-5 nats each, where the random-vision prefix leaves the decoder at the threshold
# of its massive activations) carry most of any such mean, so these differences are near its noise;
# the ranking's order is the measurement the list follows.
PREFIX_ENTRY = ("/projection/*", "/model/layers.0/self_attn/*", "/model/layers.1/self_attn/*")  # where the image prefix enters
KEEP_FP32_8BIT = (
    *PREFIX_ENTRY,
    "/model/layers.1/mlp/down_proj/*",
    "/model/layers.0/mlp/*",
    "/model/layers.27/mlp/gate_proj+up_proj/*",
    "/model/layers.2/self_attn/q_proj+k_proj+v_proj/*",
    "/model/layers.2/mlp/down_proj/*",
)
KEEP_FLOAT_Q4 = (*PREFIX_ENTRY, "/model/layers.0/mlp/*")
# GPTQ's options and SmoothQuant's α (real-weights model, 32 image prefixes + text, AMD EPYC
# AVX512-VNNI; decoder alone on fp32's prefixes / end to end, mean KL, in brackets without the
# positions over 1 nat): int8 at α 0.4 0.0184 (0.0056) / 0.0186 (0.0085); act-order + clipped
# ranges 0.0143 (0.0054) / 0.0177; both at α 0.5 (this recipe) 0.0099 (0.0042) / 0.0120, at α 0.6
# 0.0157 (0.0052) / 0.0131; α 0.5 without them 0.0159 (0.0076) / 0.0240. With GPTQ the weights
# take more of the activations' outliers than α 0.4 (chosen with round-to-nearest) gave them.
# int8's decoder in blocks of 16 (the kernel's activation blocks too): AMD EPYC AVX512-VNNI, 96
# image prefixes + text, one-ulp draws, mean KL (positions over 1 nat; median position; captions
# exact). The captioner preset (trained projection), draws 0-2: blocks of 32 0.0087 · 0.0094 ·
# 0.0107 (2-4; 0.0028; 66-71 %, shapes 85 %), blocks of 16 0.0050 · 0.0051 · 0.0047 (0; 0.0017;
# 73-76 %, shapes 92 %). The random-projection preset, draws 0-4: 0.0107 · 0.0125 · 0.0130 · 0.0126
# · 0.0118 (5-8; 0.0018) against 0.0118-0.0135 (4-5; 0.0028): the typical position and text
# (0.0026 → 0.0017) gain as there, its random vision tower's knife edges do not move; its decoder
# alone behind fp32's prefixes 0.0165 → 0.0062 (8 → 1 over 1 nat). The cost: 0.282 → 0.291 ×
# fp32's bytes, a caption 1.39× → 1.29× fp32's speed (one idle run); in Chromium (onnxruntime-web,
# which computes MatMulNBits in float32) 216 → 269 ms a token.
# These were calibrated on 32 images; 128 now re-drew the knife edges (feeds.CALIBRATION_IMAGES).
RECIPES: dict[str, BlockwiseRecipe] = {
    "int8": BlockwiseRecipe(
        bits=8,
        symmetric=True,
        block_size=16,
        algorithm="gptq",
        act_order=True,
        clip=True,
        smooth_alpha=0.5,
        keep_fp32=KEEP_FP32_8BIT,
        kept_storage="float16",
        scale_storage="float16",
    ),
    "uint8": BlockwiseRecipe(
        bits=8, symmetric=False, algorithm="gptq", act_order=True, clip=True, smooth_alpha=0.5, keep_fp32=KEEP_FP32_8BIT, kept_storage="float16", scale_storage="float16"
    ),
    # q4: decoder KL on the real-weights model (grid build): symmetric 4-bit 0.43, with down_proj
    # + head at 8 bits and outlier migration 0.21. On the dithered build, 32 image prefixes + text,
    # decoder alone / end to end: that recipe 0.45 / 0.50 (0.191 × fp32); + layer 0's MLP and the
    # projection kept float 0.43 / 0.49 (0.196); + layers 0-1's attention (this recipe) 0.28 / 0.42
    # (0.198). The rest of the end-to-end KL is the 4-bit vision encoder's; 4 bits leave no room.
    # The decoder's 4-bit blocks with zero points (uint4 codes, one zero point a block) instead of
    # symmetric, end to end (AMD EPYC AVX2): 96 image prefixes + text 0.45 → 0.39 (median position
    # 0.19 → 0.16), 32 of them 0.42 → 0.38 (smoothing α 0.25: 0.46, α 0.55: 0.39), at 0.1996 × fp32;
    # check's 4 images 0.45 → 0.52 (a dozen knife-edge positions decide 4 images' mean).
    # GPTQ's options, decoder and vision encoder (32 image prefixes + text; decoder alone / fp32's
    # decoder behind its prefixes / end to end; text): none 0.134 / 0.096 / 0.166; 0.095; clipped
    # ranges (this recipe) 0.0995 / 0.075 / 0.153; 0.054; act-order 0.097 / 0.086 / 0.163; 0.055;
    # both 0.132 / 0.081 / 0.165; 0.052; clipped at α 0.5 0.123 / 0.075 / 0.154; 0.064.
    # Layers 2-11 at 8 bits: the bytes the float16 scales freed (0.184 → 0.199 × fp32), spent where
    # the ranking of 4-bit nodes (before GPTQ) put the decoder's cost: layers 0-2 and 9 first, 12-29 near zero.
    # 32 image prefixes + text, AMD EPYC AVX512-VNNI, end to end (median position; decoder alone
    # on fp32's prefixes) at its size: without 0.124 (0.030; 0.095) at 0.184; layers 2-11 (this
    # recipe) 0.106 (0.021; 0.082) at 0.199; gate/up of layers 2-9 0.108 (0.027; 0.077) at 0.192,
    # of layers 2-16 0.106 (0.022; 0.082) at 0.199; gate/up of 2-11 + attention of 2-9 0.110
    # (0.023; 0.070) at 0.198. The vision encoder's blocks of 16 instead (0.191): 0.159 (0.030).
    # GPTQ's decoder Hessians with each image-prefix position weighing a quarter of a caption
    # token's (prefix_weight; 196 prefix rows to 20 caption rows an image, and KL is judged at the
    # tokens). 96 images + text, one-ulp draws 0-2, AMD EPYC AVX512-VNNI, mean KL (positions over 1
    # nat; the others' mean; median position; text): weight 1 0.0983 · 0.0949 · 0.1005 (31-35;
    # 0.041-0.043; 0.018; 0.050); 1/4 0.0946 · 0.0874 · 0.0894 (31-34; 0.038; 0.017; 0.045);
    # 1/10 draw 0 0.0966 (36; 0.037; 0.017; 0.038). Four times the prose instead (weight 1):
    # 0.1051 · 0.1019 (text 0.042, median 0.019). On the captioner preset the mean went the other
    # way (weight 1 0.0938 · 0.0923 · 0.0941, 16-19; 1/4 0.0996 · 0.0997 · 0.0977, 18-20), the
    # median position (0.029 → 0.028) and text (0.054 → 0.048) again with 1/4: kept, the one
    # setting under 0.1 on all six draws.
    # The decoder's 4-bit blocks of 16 (a scale and zero point per 16 rows: +3.9 MB), paid for by
    # its 8-bit nodes' blocks of 64 (−2.5 MB) and layer 11 back at 4 bits (−1.0 MB): 0.1994 × fp32.
    # Same bench, both presets, draws 0-2 (mean KL; positions over 1 nat; the others' mean;
    # median position; text): random projection 0.0947 · 0.0881 · 0.0897 (34-37; 0.037-0.038;
    # 0.017; 0.032) against 0.0946 · 0.0874 · 0.0894 (31-34; 0.038; 0.017; 0.045); captioner
    # 0.0827 · 0.0766 · 0.0837 (18-25; 0.058-0.059; 0.025-0.026; 0.028) against 0.0996 · 0.0997
    # · 0.0977 (18-20; 0.068; 0.028; 0.048). Every decoder MatMulNBits in blocks of 16 (0.209, over
    # the budget), draw 0: 0.0870 and 0.0673.
    "q4": BlockwiseRecipe(
        bits=4,
        symmetric=False,
        block_size=16,
        high_bits=("*down_proj*", "*lm_head*", "/model/layers.[2-9]/*", "/model/layers.10/*"),
        high_block_size=64,
        algorithm="gptq",
        clip=True,
        prefix_weight=0.25,
        keep_fp32=KEEP_FLOAT_Q4,
        kept_storage="float16",
        scale_storage="float16",
    ),
}
# `--recipe hqq` (q4): the decoder by HQQ with the tied head at 8 bits, no outlier migration (it
# moves error into the weights, which 4 bits cannot spare): decoder KL 0.045, end to end 0.106 on
# 16 images, measured while the checkpoint's decoder still sat on its GGUF's Q4_1 grid, which HQQ's
# float zero points can reproduce exactly (flattered; see checkpoint.synth.dither_off_grid) —
# and those float zero points have no int8 kernel, so onnxruntime runs these
# MatMulNBits in float: a caption 0.30× the speed of fp32 (measured). The encoders stay RTN.
# Off the grid (the dithered build, 96 images + text, AMD EPYC AVX2): end to end 0.88, the default
# q4 0.45 — so hqq stays opt-in.
HQQ_RECIPES: dict[str, BlockwiseRecipe] = {
    "q4": BlockwiseRecipe(bits=4, symmetric=False, high_bits=("*lm_head*",), algorithm="hqq", smooth_alpha=None),
}
# int8's vision encoder and projection: zero-point blocks. End to end on the real-weights model
# (16 image prefixes + text), symmetric everywhere gave mean KL 0.022, zero points for these two
# 0.0097; the decoder itself measured better symmetric (0.0056 vs 0.0073).
# Blocks of 32, though larger ones and MatMulInteger are faster at the encoder's 196 rows (AMD
# EPYC, AVX512-VNNI; encoder time vs fp32's / end-to-end mean KL on 64 image prefixes + text, this
# recipe 0.76× / 0.022): blocks of 128 0.62× / 0.036, of 256 0.59× / 0.042; the MLPs' fc1/fc2 as
# MatMulInteger (per-channel 7-bit, per-tensor activations) 0.56× / 0.028 (caption 1.77× fp32's
# speed against 1.54×, 9 captions each in one run); every MatMul 0.43× (32 prefixes: 0.043
# against 0.016; a few knife-edge positions carry such means, so they depend on the image set).
# Each larger prefix error tipped more knife edges (see fidelity.sources).
# q4's encoders, with either recipe: symmetric 4-bit — HQQ's per-block zero points and scales
# cost the vision encoder 67 MB instead of 54 MB, which puts the variant over 0.20 × fp32 (0.203).
# GPTQ (gptq.py) rounds the encoders too, against the calibration images' own activations (real-
# weights model, 96 image prefixes + text, AMD EPYC AVX512-VNNI; the decoders GPTQ-rounded in both):
# q4 end to end 0.294 → 0.162 (text 0.21 → 0.072 with the calibration prose); int8's prefix error
# 1.2 % → 0.8 %, fp32's decoder behind its prefixes 0.0158 → 0.0155, captions exact 56 % → 70 %.
# GPTQ's options (32 image prefixes + text, fp32's decoder behind the variant's prefixes): q4's
# clipped ranges 0.096 → 0.075; int8's act-order + clipped ranges 0.0062 → 0.0088 (one knife edge
# more; the other positions 0.0036 → 0.0031), so int8's encoders keep plain GPTQ.
# int8's vision encoder computes in float32 (blockwise.matmul_in_float: the same GPTQ-rounded 8-bit
# codes, expanded by a DequantizeLinear at each run). At accuracy level 4 the kernel also rounds
# every activation block to 8 bits, which no recipe here can avoid (the encoder's inputs have no
# outliers: each MatMul input rounds with 0.5-0.7 % error). Real-weights model, AMD EPYC
# AVX512-VNNI: the encoder's output error on 8 sample images 0.91 % → 0.38 % (out_proj and fc2
# alone in float: 0.54 %); end to end, 96 image prefixes + text, one-ulp draws 0-4: mean KL
# 0.0118 · 0.0172 · 0.0189 · 0.0171 · 0.0206 → 0.0118 · 0.0121 · 0.0132 · 0.0135 · 0.0097 (this
# form; the level-1 kernel's other sums tip other knife edges: draws 0-2 0.0093 · 0.0110 · 0.0124).
# The cost: the encoder takes about 1.15× fp32's time where level 4 took 0.73× on VNNI (on AVX2
# it took 1.5-2×); the file keeps its 8-bit bytes. docs/fidelity.md has the rest.
ENCODER_RECIPES: dict[str, BlockwiseRecipe] = {
    "int8": BlockwiseRecipe(
        bits=8, symmetric=False, algorithm="gptq", keep_fp32=KEEP_FP32_8BIT, kept_storage="float16", scale_storage="float16", float_compute=("*",)
    ),
    "q4": BlockwiseRecipe(bits=4, symmetric=True, algorithm="gptq", clip=True, keep_fp32=KEEP_FLOAT_Q4, kept_storage="float16", scale_storage="float16"),
}
ENCODERS = ("vision_encoder", "projection")
RECIPE_NAMES = ("blockwise", "dynamic", "hqq")
# Graphs that only look rows up (the transformers.js layout's embed_tokens): the table as the
# decoders' tied table is stored, 8-bit blocks (blockwise.quantize_embedding_table).
TABLES = ("embed_tokens",)
DECODERS = ("decoder", "prefix_init", "language_model", "decoder_model_merged")
# SmoothQuant's α (BlockwiseRecipe.smooth_alpha, smooth.py) for 8-bit decoders: on the real-weights
# model, 8-bit mean KL 0.0118 unsmoothed, 0.0092 at α 0.3, 0.0056 at 0.4, 0.0071 at 0.5, 0.0131 at 0.7
# (rounded to nearest; with GPTQ α 0.5 measured best, see RECIPES).
# `--keep-fp32 auto` aims the decoder at this share of the profile's KL goal (its target_kl, else
# its bound): the rest is left to the vision encoder's own quantization error, which the check
# adds on top.
AUTO_KL_SHARE = 0.5


@dataclass(frozen=True)
class FileRow:
    """One component's graph: the fp32 file and the variant written beside it."""

    component: str
    fp32_path: str
    variant_path: str
    fp32_bytes: int
    variant_bytes: int
    ops: tuple[str, ...]
    new_ops: tuple[str, ...]  # ops the fp32 graph does not use: what a runtime must add for this variant
    settings: dict[str, Any]

    @property
    def ratio(self) -> float:
        return self.variant_bytes / self.fp32_bytes if self.fp32_bytes else 0.0


@dataclass
class QuantizeReport:
    """What `quantize_bundle` wrote, how big it is against fp32, and how its check went."""

    bundle: Path
    mode: str
    rows: list[FileRow]
    seconds: float = 0.0
    check: Any = None  # vlmexport.validate.report.CheckReport, None with verify=False
    activation_ranges: list[fp16.ActivationRange] = field(default_factory=list)  # fp16 only
    notes: list[str] = field(default_factory=list)
    keep_fp32: Any = None  # sensitivity.Choice with keep_fp32="auto"

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def variant_bytes(self) -> int:
        return sum(r.variant_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.variant_bytes / self.fp32_bytes if self.fp32_bytes else 0.0

    @property
    def passed(self) -> bool | None:
        """True/False from the check, None when it was not run."""
        return None if self.check is None else bool(self.check.passed)


def quantize_bundle(
    onnx_dir: Path,
    mode: str = "int8",
    components: list[str] | None = None,
    per_channel: bool | None = None,
    exclude_nodes: list[str] | None = None,
    force: bool = False,
    verify: bool = True,
    optimize: bool = False,
    on_step: Callable[[str], None] | None = None,
    recipe: str = "blockwise",
    keep_fp32: str | None = None,
    calibration: Path | None = None,
) -> QuantizeReport:
    """Write the `mode` variant of the bundle at `onnx_dir` and (unless `verify` is False) check it
    against the bundle's fp32 variant with the `mode` tolerance profile.

    `components` limits which graphs are quantized; the others are the variant's through their
    fp32 files. `recipe` is "blockwise" (MatMulNBits, every mode but fp16) or "dynamic"
    (onnxruntime's quantize_dynamic, int8/uint8); `per_channel` overrides the dynamic recipe's
    per-component choice. `exclude_nodes` are fnmatch patterns of node names kept in float32;
    `keep_fp32="auto"` adds the fewest decoder nodes whose float32 form meets the profile, by a
    measured sensitivity ranking (sensitivity.py). `calibration` is a folder of images like the
    ones the model will caption, GPTQ's calibration instead of the bundled sample images
    (feeds.calibration_images). A failing check does not raise:
    `report.passed` is False and the manifest says so.

    Raises:
        UsageError: unknown mode or component, a flag that does not apply to the mode, a pattern
            that matches no node, a calibration folder without images, or the variant already
            present without `force`.
        ImageError: a calibration image cannot be read (nothing is written).
        BundleError: no bundle or no fp32 variant at `onnx_dir`, fp32 files that do not match
            the manifest, a bundle folder that cannot be written, or a variant graph that ONNX
            Runtime cannot load (nothing is written in all these cases).
        VlmExportError: whatever `check_bundle` raises when the check cannot run (no profile
            for the mode, unreadable images); the variant is then written but has no verdict.
    """
    started = time.perf_counter()
    step = on_step or (lambda message: None)
    onnx_dir = Path(onnx_dir)
    manifest = _fp32_manifest(onnx_dir)
    selected = _check_arguments(manifest, mode, components, per_channel, force, recipe, keep_fp32)
    fp32_files = manifest.variants["fp32"]
    step("verifying the fp32 files")
    verify_files(onnx_dir, manifest, only=list(fp32_files.values()))
    excluded = _match_patterns({name: _node_names(onnx_dir / fp32_files[name]) for name in selected}, exclude_nodes or [])
    report = QuantizeReport(onnx_dir, mode, [])
    if mode == "fp16":
        step("measuring activation ranges (fp32)")
        report.activation_ranges = _ranges(onnx_dir, manifest, selected)
    chosen = _recipe(mode, recipe)
    # `--recipe hqq` keeps its round-to-nearest encoders (HQQ_RECIPES); dynamic and fp16 have no blocks.
    blockwise = chosen is not None and recipe == "blockwise"
    calibrated = [n for n in selected if blockwise and n in DECODERS + ENCODERS and _component_recipe(mode, n, recipe).algorithm == "gptq"]
    if calibration is not None and not calibrated:
        raise UsageError(f"--calibration-images calibrates GPTQ, which --mode {mode} --recipe {recipe} does not use", "drop the flag, or use --mode int8, uint8 or q4 with the blockwise recipe")
    images = calibration_images(onnx_dir, calibration) if calibrated else None  # unreadable images fail here, before any work
    smoothed = [name for name in selected if chosen is not None and name in DECODERS and chosen.smooth_alpha is not None]
    peaks = _peaks(onnx_dir, manifest, smoothed, step) if smoothed else {}
    floats = {name: _component_recipe(mode, name, recipe).keep_fp32 for name in calibrated}
    prefix_weight = chosen.prefix_weight if chosen is not None else 1.0
    hessians = _hessians(onnx_dir, manifest, floats, images.pixels, step, prefix_weight) if images else {}
    if keep_fp32 == "auto":
        kept, choice = _auto_keep(onnx_dir, manifest, mode, recipe, peaks, hessians, excluded, step)
        excluded = {name: sorted(set(excluded[name]) | set(kept if name in DECODERS else [])) for name in excluded}
        report.notes.append(_auto_note(choice))
        report.keep_fp32 = choice
    unfused: list[str] = []
    with _staging(onnx_dir, mode) as stage:
        for name in selected:
            step(f"{mode}: {name}")
            model = onnx.load(str(onnx_dir / fp32_files[name]))  # one graph in memory at a time
            fp32_ops = _ops(model)
            model, fused = optimize_graph(model, name) if optimize else (model, False)
            ranges = [r for r in report.activation_ranges if r.component == name]
            factors = smooth.smooth(model, peaks[name], _smooth_alpha(mode, recipe)) if name in peaks else {}
            own = gptq.rescaled(hessians.pop(name, {}), factors)  # one graph's Hessians in memory at a time, beside the shared ones
            quantized, settings = _quantize(model, mode, name, per_channel, excluded[name], ranges, recipe, own)
            if images and "GPTQ" in settings.get("method", ""):
                settings["calibration"] = _calibration_note(images.source, prefix_weight if name in DECODERS else 1.0)
            del own
            if name in peaks:
                settings["smoothing"] = f"SmoothQuant-style outlier migration, alpha {_smooth_alpha(mode, recipe)}, {len(factors)} activations (smooth.py)"
            if fused:
                settings["optimized"] = "onnxruntime.transformers fusions (see vlmexport.quantize.optimize)"
            elif optimize:
                unfused.append(name)
            relative = variant_path(fp32_files[name], mode)
            _save(quantized, stage / relative)
            _loads_in_onnxruntime(stage / relative)
            sizes = (_size(onnx_dir / fp32_files[name]), _size(stage / relative))
            report.rows.append(FileRow(name, fp32_files[name], relative, *sizes, _ops(quantized), tuple(sorted(set(_ops(quantized)) - set(fp32_ops))), settings))
        aliases = _link_aliases(onnx_dir, stage, manifest.layout, mode, report.rows, fp32_files)
        if unfused:
            report.notes.append(f"--optimize: no fusion is measured faster for {', '.join(unfused)} (see vlmexport/quantize/optimize.py); left as exported")
        step("writing the manifest")
        _commit(onnx_dir, stage, manifest, mode, report.rows, aliases)
    del hessians
    if verify:
        step(f"checking {mode} against fp32")
        from vlmexport.validate.check import check_bundle

        report.check = check_bundle(onnx_dir, model_dir=None, variant=mode, on_step=step)
    else:
        report.notes.append(f"not checked (--no-verify): run `vlmexport check --onnx-dir {onnx_dir} --variant {mode}`")
    report.seconds = time.perf_counter() - started
    return report


def _fp32_manifest(onnx_dir: Path) -> Manifest:
    manifest = read_manifest(onnx_dir)
    if "fp32" not in manifest.variants:
        raise BundleError(f"{onnx_dir} has no fp32 variant to quantize", "re-run `vlmexport export`")
    return manifest


def _check_arguments(
    manifest: Manifest, mode: str, components: list[str] | None, per_channel: bool | None, force: bool, recipe: str, keep_fp32: str | None
) -> list[str]:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", f"use one of: {', '.join(MODES)}")
    if recipe not in RECIPE_NAMES:
        raise UsageError(f"unknown recipe {recipe!r}", f"use one of: {', '.join(RECIPE_NAMES)}")
    if recipe == "dynamic" and mode not in integer.WEIGHT_TYPES:
        raise UsageError(f"--recipe dynamic applies to int8 and uint8, not {mode}", "drop the flag")
    if recipe == "hqq" and mode not in HQQ_RECIPES:
        raise UsageError(f"--recipe hqq applies to {', '.join(HQQ_RECIPES)}, not {mode}", "drop the flag")
    if per_channel is not None and recipe != "dynamic":
        raise UsageError("--per-channel/--no-per-channel apply to --recipe dynamic", "add --recipe dynamic or drop the flag")
    if keep_fp32 not in (None, "auto"):
        raise UsageError(f"--keep-fp32 {keep_fp32!r} is not a choice", "pass --keep-fp32 auto, or name nodes with --exclude-nodes PATTERN")
    if keep_fp32 == "auto" and mode == "fp16":
        # The converter keeps every node's name and changes only types: no node has a second form to rank.
        raise UsageError("--keep-fp32 auto ranks quantized nodes; fp16 keeps its measured-hot nodes float32 already", "drop --keep-fp32 for fp16")
    first_pass = decoder_graphs(manifest.layout)[0]
    if keep_fp32 == "auto" and components is not None and first_pass not in components:
        raise UsageError("--keep-fp32 auto ranks the decoder's nodes, which --components leaves out", f"include {first_pass} in --components")
    available = list(manifest.variants["fp32"])
    unknown = [c for c in components or [] if c not in available]
    if unknown:
        raise UsageError(f"unknown component(s) {', '.join(unknown)} for a {manifest.layout} bundle", f"use some of: {', '.join(available)}")
    if per_channel is not None and mode not in integer.WEIGHT_TYPES:
        raise UsageError(f"--per-channel/--no-per-channel apply to int8 and uint8, not {mode}", "drop the flag")
    if mode in manifest.variants and not force:
        raise UsageError(f"the bundle already has a {mode} variant", "pass --force to replace it")
    return [c for c in available if components is None or c in components]


@contextmanager
def _staging(onnx_dir: Path, mode: str) -> Iterator[Path]:
    """A hidden folder inside the bundle (same file system: moving out of it is a rename), removed after."""
    try:
        folder = tempfile.TemporaryDirectory(prefix=f".quantize-{mode}-", dir=onnx_dir)
    except OSError as exc:
        raise BundleError(f"cannot write into {onnx_dir} ({exc.strerror})", "quantize a bundle folder you can write to (or a copy of it)") from exc
    with folder as path:
        yield Path(path)


def _node_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]


def _match_patterns(nodes: dict[str, list[str]], patterns: list[str]) -> dict[str, list[str]]:
    """Node names per component matching any pattern; a pattern matching nothing is an error."""
    matched = {name: [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)] for name, names in nodes.items()}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(node, pattern) for nodes in matched.values() for node in nodes):
            raise UsageError(f"--exclude-nodes {pattern!r} matches no node name", "patterns are fnmatch-style over ONNX node names, e.g. '*lm_head*' or '/model/layers.0/*'")
    return matched


def _quantize(
    model: onnx.ModelProto,
    mode: str,
    component: str,
    per_channel: bool | None,
    exclude: list[str],
    ranges: list[fp16.ActivationRange],
    recipe: str,
    hessians: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    if mode == "fp16":
        return fp16.convert_fp16(model, ranges, exclude)
    if recipe == "dynamic":
        return integer.quantize_integer(model, mode, component, per_channel, exclude)
    if component in TABLES:
        return quantize_embedding_table(model, _decoder_recipe(mode, recipe))
    return quantize_blockwise(model, _component_recipe(mode, component, recipe), exclude, hessians=hessians)


def _component_recipe(mode: str, component: str, recipe: str) -> BlockwiseRecipe:
    """The blockwise recipe of one component (the encoders have their own, ENCODER_RECIPES)."""
    return ENCODER_RECIPES.get(mode, RECIPES[mode]) if component in ENCODERS else _decoder_recipe(mode, recipe)


def _recipe(mode: str, recipe: str) -> BlockwiseRecipe | None:
    """The blockwise recipe of `mode`'s decoder (None for fp16 and the dynamic recipe)."""
    if recipe == "hqq":
        return HQQ_RECIPES[mode]
    return RECIPES.get(mode) if recipe == "blockwise" else None


def _decoder_recipe(mode: str, recipe: str) -> BlockwiseRecipe:
    """`_recipe` where a blockwise recipe must exist (smoothing, MatMulNBits).

    Raises:
        UsageError: mode and recipe have none (fp16, or the dynamic recipe).
    """
    chosen = _recipe(mode, recipe)
    if chosen is None:
        raise UsageError(f"--mode {mode} --recipe {recipe} has no blockwise recipe", "use --recipe blockwise or hqq")
    return chosen


def _smooth_alpha(mode: str, recipe: str) -> float:
    """The decoder recipe's SmoothQuant α; peaks are measured only for recipes that have one.

    Raises:
        UsageError: the recipe does not smooth.
    """
    alpha = _decoder_recipe(mode, recipe).smooth_alpha
    if alpha is None:
        raise UsageError(f"--mode {mode} --recipe {recipe} does not migrate outliers", "use the int8 or uint8 blockwise recipe")
    return alpha


def _peaks(onnx_dir: Path, manifest: Manifest, components: list[str], step: Callable[[str], None]) -> dict[str, dict]:
    """Per decoder graph, the per-channel peak of every activation smooth.py can migrate, measured
    on what captioning the sample images feeds it (fp32)."""
    from vlmexport.quantize.feeds import recorded_feeds

    step("measuring activation outliers (fp32)")
    feeds = recorded_feeds(onnx_dir)
    peaks = {}
    for name in components:
        model = onnx.load(str(onnx_dir / manifest.variants["fp32"][name]))
        peaks[name] = smooth.activation_peaks(model, feeds[name], [s.activation for s in smooth.smoothable(model)])
    return peaks


def _calibration_note(images: str, prefix_weight: float) -> str:
    weighed = f" (each prefix position weighing {prefix_weight:g} of a token's)" if prefix_weight != 1 else ""
    return (
        f"GPTQ against {images}, each encoded and (decoders) teacher-forced with fp32's "
        f"{CALIBRATION_TOKENS}-token greedy caption{weighed}, and configs/calibration/text.txt"
    )


def _hessians(
    onnx_dir: Path, manifest: Manifest, kept: dict[str, tuple[str, ...]], pixels: np.ndarray, step: Callable[[str], None], prefix_weight: float = 1.0
) -> dict[str, dict[str, np.ndarray]]:
    """Per component of `kept`, GPTQ's Hessian (Σ xᵀx) of every input of its fp32 graph's MatMuls
    but those its recipe keeps float (`kept`: the patterns of their names), on the calibration
    images `pixels` (feeds.calibrate). A layout's graph of the cached steps is given its
    first-pass graph's: the same weights and tensor names, rounded against the same inputs;
    each graph's own outlier migration rescales them (gptq.rescaled)."""
    first = decoder_graphs(manifest.layout)[0]
    graphs = {name: first if name in DECODERS else name for name in kept}
    probes: dict[str, Probe] = {}
    sums: dict[str, gptq.HessianSums] = {}
    for graph in sorted(set(graphs.values())):
        model = onnx.load(str(onnx_dir / manifest.variants["fp32"][graph]))
        constants = {i.name for i in model.graph.initializer}
        patterns = kept[next(name for name in kept if graphs[name] == graph)]  # the decoders share one recipe
        rounded = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants and not any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]
        activations = sorted({n.input[0] for n in rounded})
        sums[graph] = gptq.HessianSums(activations)
        if activations:  # else every MatMul is kept float (int8's projection)
            probes[graph] = Probe(model, activations, sums[graph], spin=graph not in RUN_ONCE)
        del model
    if not probes:  # nothing to round by GPTQ (int8's projection alone): no calibration to run
        return {name: {} for name in graphs}
    step(f"GPTQ: calibration images (fp32), Hessians of {sum(len(s.names) for s in sums.values())} MatMul inputs of {', '.join(probes)}")
    calibrate(onnx_dir, pixels, probes, prefix_weight=prefix_weight)
    del probes
    measured = {graph: found.sums for graph, found in sums.items()}
    return {name: measured[graph] for name, graph in graphs.items()}


def _auto_keep(
    onnx_dir: Path,
    manifest: Manifest,
    mode: str,
    recipe: str,
    peaks: dict,
    hessians: dict[str, dict[str, np.ndarray]],
    excluded: dict[str, list[str]],
    step: Callable[[str], None],
) -> tuple[list[str], Any]:
    """The fewest decoder nodes to keep float32 so the decoder alone meets AUTO_KL_SHARE of the
    profile's KL goal and its top-1 floor, ranked on the graph that runs the first pass (in the
    distilvit layout the same node names are kept in language_model too)."""
    from vlmexport.quantize import sensitivity
    from vlmexport.quantize.fidelity import fidelity_set
    from vlmexport.runtime.bundle import open_bundle
    from vlmexport.validate.profiles import profile_named

    component = decoder_graphs(manifest.layout)[0]
    profile = profile_named(mode)
    margin = profile.logits.top1_margin
    if margin is None:  # the near-tie margin is a bound: it comes from the profile, never a default here
        raise UsageError(f"profile {profile.name} has no [logits] top1_margin, which --keep-fp32 auto needs", "add it to the profile")
    step("--keep-fp32 auto: fidelity set (fp32)")
    fset = fidelity_set(onnx_dir)
    fp32 = onnx.load(str(onnx_dir / manifest.variants["fp32"][component]))
    factors = smooth.smooth(fp32, peaks[component], _smooth_alpha(mode, recipe)) if component in peaks else {}
    low = onnx.ModelProto()
    low.CopyFrom(fp32)
    # never fp16 (refused above)
    low, _ = _quantize(low, mode, component, None, excluded[component], [], recipe, gptq.rescaled(hessians.get(component, {}), factors))
    graph = sensitivity.switchable(fp32, low)
    template = open_bundle(onnx_dir, "fp32", components=("embed_tokens",))  # only where a layout has it
    measurer = sensitivity.Measurer(graph, template, component, fset, margin)
    ranking = sensitivity.rank(measurer, on_node=lambda j, n: step(f"--keep-fp32 auto: node {j + 1}/{n} alone"))
    step("--keep-fp32 auto: fewest nodes kept")
    target = profile.end_to_end.goal_kl * AUTO_KL_SHARE
    choice = sensitivity.keep_fewest(measurer, ranking, target, profile.end_to_end.teacher_forced_top1)
    return choice.kept, choice


def _auto_note(choice: Any) -> str:
    met = "meets" if choice.met else "does not meet, even with every ranked node kept,"
    return (
        f"--keep-fp32 auto: {len(choice.kept)} of {len(choice.ranking)} decoder nodes kept float32 "
        f"({', '.join(choice.kept[:6])}{' …' if len(choice.kept) > 6 else ''}); the decoder then {met} its target: "
        f"KL {choice.fidelity.kl:.4g} (all quantized: {choice.all_low.kl:.4g}), top-1 {choice.fidelity.top1:.3f}; "
        f"{choice.quantized_share:.1%} of the ranked weight bytes quantized"
    )


def _ranges(onnx_dir: Path, manifest: Manifest, selected: list[str]) -> list[fp16.ActivationRange]:
    """Peak activations of each selected fp32 graph, fed what captioning sample images feeds it."""
    from vlmexport.quantize.feeds import recorded_feeds

    feeds = recorded_feeds(onnx_dir)
    files = manifest.variants["fp32"]
    ranges = [r for name in selected for r in fp16.activation_ranges(onnx_dir / files[name], name, feeds[name])]
    return sorted(ranges, key=lambda r: -r.peak)


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() >= TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + "_data")
    else:
        onnx.save_model(model, str(path))


def _loads_in_onnxruntime(path: Path) -> None:
    from vlmexport.runtime.bundle import session

    session(path)  # raises BundleError naming the file


def _ops(model: onnx.ModelProto) -> tuple[str, ...]:
    """Op types a graph uses, contrib ops with their domain (what a runtime must implement)."""
    return tuple(sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node}))


def _size(path: Path) -> int:
    external = path.with_name(path.name + "_data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def _link_aliases(onnx_dir: Path, stage: Path, layout: str, mode: str, rows: list[FileRow], fp32_files: dict[str, str]) -> dict[str, str]:
    """Every graph of the `mode` variant again under the layout's second name for it
    (manifest.ALIASES), staged as a hard link (a copy where the file system has none): the
    quantized graphs, and the fp32 graphs of components `--components` left out, since a library
    asking for that name looks for every component. Returns alias → the file it repeats."""
    suffix = ALIASES.get(layout, {}).get(mode)
    if suffix is None:
        return {}
    written = {row.component: row.variant_path for row in rows}
    aliases = {}
    for component, fp32_path in fp32_files.items():
        alias, original = variant_path(fp32_path, suffix), written.get(component, fp32_path)
        source = stage / original if component in written else onnx_dir / original
        (stage / alias).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, stage / alias)
        except OSError:
            shutil.copyfile(source, stage / alias)
        aliases[alias] = original
    return aliases


def _commit(onnx_dir: Path, stage: Path, manifest: Manifest, mode: str, rows: list[FileRow], aliases: dict[str, str]) -> None:
    """Move the staged files into the bundle and write the manifest; on any error, undo the moves.

    Files of a replaced variant (`--force`) are set aside first and deleted only at the end.
    """
    old = manifest.variants.get(mode, {})
    stale = {rel for rel, info in manifest.files.items() if info.get("variant") == mode}
    stale |= {rel for rel in old.values() if rel not in manifest.variants["fp32"].values()}
    new_files = [p.relative_to(stage).as_posix() for p in sorted(stage.rglob("*")) if p.is_file()]
    for rel in stale:
        manifest.files.pop(rel, None)
    manifest.variants[mode] = dict(manifest.variants["fp32"])
    for row in rows:
        manifest.variants[mode][row.component] = row.variant_path
        manifest.describe_file(
            stage, row.variant_path, component=row.component, variant=mode, **signature(stage / row.variant_path),
            ops=list(row.ops), quantization=row.settings,
        )  # fmt: skip
    for alias, original in aliases.items():
        manifest.describe_file(stage, alias, variant=mode, alias_of=original)
    for rel in new_files:
        if rel not in manifest.files:  # external data beside a >2 GB graph
            manifest.describe_file(stage, rel, variant=mode)
    manifest.checks.pop(mode, None)  # a verdict about the files being replaced
    backup = stage / ".replaced"
    moved: list[str] = []
    set_aside: list[str] = []
    try:
        for rel in sorted(stale | set(new_files)):
            if (onnx_dir / rel).exists():
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(onnx_dir / rel, backup / rel)
                set_aside.append(rel)
        for rel in new_files:
            (onnx_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, onnx_dir / rel)
            moved.append(rel)
        manifest.write(onnx_dir)
    except BaseException:
        for rel in moved:
            (onnx_dir / rel).unlink(missing_ok=True)
        for rel in set_aside:
            os.replace(backup / rel, onnx_dir / rel)
        raise
    shutil.rmtree(backup, ignore_errors=True)

