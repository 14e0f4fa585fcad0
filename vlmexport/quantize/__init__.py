"""Quantized variants of a bundle, beside its fp32 graphs: `quantize.quantize_bundle`.

| mode  | how (onnxruntime's own tools)                                   | files                  |
|-------|-----------------------------------------------------------------|------------------------|
| int8  | quantize_dynamic: int8 symmetric per-channel weights, uint8 dynamic activations (integer.py) | `*_int8.onnx`  |
| uint8 | the same with uint8 asymmetric weights — transformers.js' `model_quantized.onnx` form | `*_uint8.onnx` |
| fp16  | transformers' convert_float_to_float16, graph I/O fp32, measured-hot nodes fp32 (fp16.py) | `*_fp16.onnx`  |
| q4    | MatMulNBitsQuantizer: 4-bit, blocks of 32, symmetric, accuracy level 4 (q4.py) | `*_q4.onnx`    |

Choices made by measurement (bench/quantize_bench.py and the scripts' numbers in the lead's
issue note; full-size synthetic = SigLIP-base + SmolLM-135M shapes, random weights):

- Per-channel int8 weights everywhere: on the full-size decoder the first-pass logits' mean
  error is 0.0099 per-channel vs 0.0121 per-tensor (cosine 0.99967 vs 0.99950), at no measured
  speed cost (decode step 117 vs 172 ms median, noisy shared machine).
- Patch-embedding Conv stays fp32: onnxruntime-web 1.30 does run ConvInteger (proved under
  Node, signed and unsigned weights), but quantizing it nearly doubles the vision encoder's
  error (mean 0.0140 → 0.0248) to save 1.7 MB of 88 MB, with no measured speed-up.
- The tied embedding / LM head table (49152 × 576 for SmolLM) is quantized and stored once:
  int8/uint8 per tensor for both its Gather and its MatMul (shared.py), q4 as one 4-bit copy
  read by MatMulNBits and GatherBlockQuantized (q4.py), fp16 by conversion of the one table.
- Signed int8 weights, reduce_range off; uint8 for machines without VNNI (see integer.py).
- `--optimize`: no onnxruntime.transformers fusion was measured faster, so none is applied
  (optimize.py has the numbers and the BiasGelu trap).

Measured (bench/quantize_bench.py, one run, shared 2-core machine; full = full-size synthetic
compact bundle, 884 MB fp32; shapes = the trained shapes example, 32 held-out images):

| mode  | full bytes vs fp32 | 30-token caption vs fp32 | shapes captions = fp32 | teacher-forced top-1 |
|-------|-------------------|--------------------------|------------------------|----------------------|
| int8  | 0.256 (226 MB)    | 2.03× faster             | 32/32                  | 1.000                |
| uint8 | 0.256             | 1.56× faster             | 32/32                  | 1.000                |
| fp16  | 0.501             | 1.43× (noisy; per-token decode is slower than fp32) | 32/32 | 1.000       |
| q4    | 0.161 (142 MB)    | 2.78× faster             | 28/32                  | 0.984                |

Every variant was run in onnxruntime-web 1.30 (WebAssembly, under Node): the ops each graph
uses are recorded per file in the manifest (`files[path].ops`), and
`webcheck.web_agreement` runs a bundle's variants there and compares with onnxruntime.
"""
