"""`--optimize`: onnxruntime.transformers graph fusions on the fp32 graph before quantizing.

Only fusions measured faster with parity intact are switched on (`FUSIONS`). The fusions are
pure graph rewrites at opt_level 0 — no onnxruntime session optimisation is baked into the
file, so the result stays portable to onnxruntime-web.

Measured (full-size SigLIP-base vision tower, batch 1, one thread, CPU time, median of 10):
the "vit" fusions that match the traced graph — SkipLayerNormalization ×24 and FastGelu ×12
(Attention does not match: the tracer's dynamic Reshapes break the pattern) — keep parity
(max abs 3.3e-6) but run 378 ms against 370 ms unfused: 2 % slower, because onnxruntime's own
session-time fusions already do the same work. No fusion earned its place, so `FUSIONS` is
empty and `--optimize` changes nothing today; the report says so. Adding a component is one
entry once a fusion is measured faster.

Known trap, always off: the BiasGelu fusion (and the GELU approximation) would turn SigLIP's
tanh-approximated GELU into the exact erf GELU (or the reverse), an error that grows from
2e-6 to 5e-4 on the vision output — not a speed-up worth a wrong model.
"""

from __future__ import annotations

import logging

import onnx

# component → (onnxruntime.transformers model type, fusion switches to turn on); components
# not listed are left as exported. Candidate measured and rejected (see above):
# "vision_encoder": ("vit", {"enable_skip_layer_norm": True, "enable_gelu": True})
FUSIONS: dict[str, tuple[str, dict[str, bool]]] = {}
ALWAYS_OFF = ("enable_bias_gelu", "enable_gelu_approximation", "enable_gemm_fast_gelu", "enable_bias_skip_layer_norm", "enable_embed_layer_norm")


def fusion_options(component: str):  # -> FusionOptions | None
    """The FusionOptions used for `component`, or None when it is not optimised."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    if component not in FUSIONS:
        return None
    model_type, switches = FUSIONS[component]
    options = FusionOptions(model_type)
    for name in vars(options):
        if name.startswith("enable_") and isinstance(getattr(options, name), bool):
            setattr(options, name, bool(switches.get(name, False)))
    for name in ALWAYS_OFF:
        setattr(options, name, False)
    return options


def optimize_graph(model: onnx.ModelProto, component: str) -> tuple[onnx.ModelProto, bool]:
    """`model` with the measured-good fusions for `component` applied, and whether any were."""
    from onnxruntime.transformers.optimizer import optimize_model

    options = fusion_options(component)
    if options is None:
        return model, False
    model_type, _ = FUSIONS[component]
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # num_heads/hidden_size 0: read from the graph's Reshape shapes by the fusion itself.
    optimized = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, optimization_options=options, opt_level=0)
    return optimized.model, True
