"""Quantized variants of a bundle, beside its fp32 graphs: `quantize.quantize_bundle`.

| mode  | what it is inside (recorded per file in the manifest)                                   | files          |
|-------|-----------------------------------------------------------------------------------------|----------------|
| int8  | MatMulNBits 8-bit: decoder in symmetric blocks of 16 at accuracy level 4 with outliers migrated, vision encoder in blocks of 32 with zero points computed float32 (blockwise.matmul_in_float); the projection and the most sensitive decoder nodes (layers 0-2, layer 27's gate/up) computed float32 from float16-stored weights (blockwise.py, smooth.py, quantize.KEEP_FP32_8BIT) | `*_int8.onnx`  |
| uint8 | uint8 codes and a zero point per block, in blocks of 32 throughout, its vision encoder at accuracy level 4 | `*_uint8.onnx` |
| fp16  | convert_float_to_float16, graph I/O fp32, measured-hot nodes in real float32 islands (fp16.py) | `*_fp16.onnx`  |
| q4    | MatMulNBits 4-bit blocks of 32 with zero points, down_proj and the tied head at 8 bits, the projection and layers 0-1's attention and layer 0's MLP float (float16-stored; quantize.KEEP_FLOAT_Q4) (`--recipe hqq`: decoder by HQQ) | `*_q4.onnx`    |

In int8, uint8 and q4 the decoder's and the vision encoder's weights are rounded by GPTQ (gptq.py)
against calibration images and prose (feeds.calibrate): the same grid and kernels, codes
chosen so the rounding errors cancel on real inputs (q4 end to end on the real-weights model
0.39 → 0.16; the tables below were measured before it, with round-to-nearest). Their
MatMulNBits scales are stored float16 and rounded to it before GPTQ chooses codes
(blockwise.store_scales_half: int8 0.296 → 0.282 × fp32, then 0.291 in blocks of 16; q4 0.200 → 0.184).

`--recipe dynamic` keeps onnxruntime's quantize_dynamic (MatMulInteger; int8 with 7-bit weights,
uint8 U8U8) for runtimes without MatMulNBits (integer.py). `--keep-fp32 auto` ranks every decoder
node by the KL its quantization costs alone and keeps the fewest fp32 that meet the profile
(sensitivity.py). Every recipe's choice was measured on the real-weights model
(`vlmexport synth --preset smollm2-135m-real`: pretrained SmolLM2-135M-Instruct decoder), mean
KL(fp32 ‖ variant) teacher-forced on 8 image prefixes + real English text (fidelity.py), decoder
only, x86 AVX512-VNNI. This table was measured on the checkpoint's first build, whose weights
still sat on the GGUF's grids (Q4_1 blocks; the tied table Q8_0, exactly int8's head blocks): it
flatters every 8-bit head and, most, HQQ, which can recover a Q4_1 grid exactly. synth now
dithers the weights off those grids (checkpoint.synth.dither_off_grid); the README's fidelity
table is from that build.

| decoder recipe                                                  | mean KL | bytes   |
|-----------------------------------------------------------------|---------|---------|
| quantize_dynamic int8 (the old int8: per-tensor activations)    | 0.88    | 136 MB  |
| MatMulNBits 8-bit, block 32, accuracy level 4                   | 0.0118  | 152 MB  |
| … accuracy level 0 (float activations; 736 ms/step, unusable)   | 0.0040  | 152 MB  |
| … block 16                                                      | 0.0126  | 169 MB  |
| … block 128                                                     | 0.050   | 265 MB (head fp32) |
| … with outlier migration α 0.3 / 0.4 / 0.5 / 0.7                | 0.0092 / **0.0056** / 0.0071 / 0.0131 | 152 MB |
| … uint8 (zero points), α 0.4                                    | 0.0073  | 156 MB  |
| MatMulNBits 4-bit, block 32 (symmetric; asymmetric 0.42)        | 0.43    | 85 MB   |
| … block 16                                                      | 0.30    | 101 MB  |
| … down_proj 8-bit / + head 8-bit, α 0.4                         | 0.32 / 0.21 | 98 / 112 MB |
| HQQ 4-bit (onnxruntime's HQQ config), down_proj + head 8-bit / head 8-bit (on the grid: flattered) | 0.049 / **0.045** | 122 / 112 MB |
| fp16, converter alone (float32 "kept" nodes exchange float16)   | 6.5     |         |
| fp16, measured-hot nodes in joined float32 islands              | 1.6e-5  |         |

The tied embedding / LM head table is quantized and stored once: int8/uint8/q4 as one blockwise
copy read by MatMulNBits and GatherBlockQuantized (blockwise.py), the dynamic recipe per tensor
(shared.py), fp16 by conversion of the one table. The patch-embedding Conv stays fp32.
`--optimize`: no onnxruntime.transformers fusion was measured faster (optimize.py).

Every variant runs in onnxruntime-web (WebAssembly, under Node): `webcheck.web_agreement` runs a
bundle's variants there; the browser computes MatMulNBits in float32 (it ignores accuracy level
4), so its outputs are held to the variant's profile against fp32, not to native bit-equality.
`check` proves from the stored weights that no integer kernel can saturate on x86 without VNNI
(validate/portable.py).
"""
