"""`export`: a checkpoint → a verified ONNX bundle in the distilvit or compact layout."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from vlmexport.bundle.manifest import LAYOUTS, Manifest
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.merge import MergeReport, verified_merge
from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.errors import UsageError
from vlmexport.exporter import graphs, library_configs
from vlmexport.exporter.attention import FUSED_OPSET, export_attention
from vlmexport.exporter.memory import release_freed_memory, store_linear_weights_transposed
from vlmexport.exporter.onnx_io import trace_graph, write_graph
from vlmexport.fsutil import atomic_output_dir, check_output_dir
from vlmexport.samples import sample_images
from vlmexport.validate.metrics import Measurement
from vlmexport.validate.profiles import merge_bounds, profile_named
from vlmexport.validate.reference import TorchRunner
from vlmexport.validate.smoke import record_reference, verify_bundle

OPSETS = range(18, 24)
# 23: one ONNX Attention node per layer and RotaryEmbedding (attention.py); int8 decode step
# 7.9-8.4 → 6.9-7.2 ms on the full-size synthetic model. 18-22: the same attention decomposed
# into MatMul/Softmax/... for runtimes without opset 23 (onnxruntime < 1.23).
DEFAULT_OPSET = FUSED_OPSET
LIBRARIES = ("vlmexport", "torch", "transformers", "peft", "onnx", "onnxruntime")


@dataclass
class ExportResult:
    """What was written, how big it is against the parameters, and how it verified."""

    path: Path
    layout: str
    files: dict[str, int]  # graph path → bytes
    parameters: dict[str, int]  # component → parameter count
    parameter_bytes: int
    bundle_bytes: int
    seconds: float
    smoke: list[Measurement] = field(default_factory=list)
    merge: MergeReport | None = None  # the verified merge (None: the checkpoint had no adapters)


def _component_graphs(model: PrefixConditioningVLM, layout: str, shape: graphs.DecoderShape) -> dict[str, torch.nn.Module]:
    lm = model.causal_lm
    modules: dict[str, torch.nn.Module] = {}
    if layout == "transformers.js":
        modules["vision_encoder"] = graphs.VisionProjectionGraph(model.vision_encoder, model.projection)
        modules["embed_tokens"] = graphs.EmbedTokensGraph(lm)
        modules["decoder_model_merged"] = graphs.EmbedsDecoderGraph(lm, shape)
    else:
        modules["vision_encoder"] = graphs.VisionGraph(model.vision_encoder)
        modules["projection"] = graphs.ProjectionGraph(model.projection)
    if layout == "distilvit":
        modules["prefix_init"] = graphs.PrefixInitGraph(lm, shape)
        modules["language_model"] = graphs.LanguageModelGraph(lm, shape)
    elif layout == "compact":
        modules["decoder"] = graphs.compact_decoder_graph(lm, shape)
    # torch.onnx.export restores each wrapper's mode afterwards, recursively: a wrapper left in
    # (the default) training mode would switch dropout on in the model it wraps.
    return {name: module.eval() for name, module in modules.items()}


def _example_inputs(name: str, module: torch.nn.Module, model: PrefixConditioningVLM, shape: graphs.DecoderShape) -> tuple[torch.Tensor, ...]:
    size = model.vision_encoder.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    if name == "vision_encoder":
        return (pixels,)
    hidden = model.vision_features(pixels)
    if name == "projection":
        return (hidden,)
    if name == "embed_tokens":
        return (torch.randint(0, shape.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0)),)
    if name == "prefix_init":
        ids = torch.randint(0, shape.vocab_size, (2, 2), generator=torch.Generator().manual_seed(0))
        return (model.projection(hidden)[:, :3].contiguous(), ids)
    return graphs.example_decoder_inputs(module, shape)


def _parameter_counts(model: PrefixConditioningVLM) -> dict[str, int]:
    def count(module: torch.nn.Module) -> int:
        # Each tensor once: a tied head shares the embedding's storage.
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

    return {
        "vision_encoder": count(model.vision_encoder),
        "projection": count(model.projection),
        "decoder": count(model.causal_lm),
    }


def _model_facts(checkpoint: Checkpoint, model: PrefixConditioningVLM, shape: graphs.DecoderShape, prefix_length: int, parameters: dict[str, int]) -> dict:
    tokenizer = checkpoint.tokenizer
    return {
        "vision_type": checkpoint.config.vision_type,
        "text_type": checkpoint.config.text_type,
        "image_size": checkpoint.preprocessor.height,
        "prefix_length": prefix_length,
        "num_layers": shape.num_layers,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "embed_dim": shape.embed_dim,
        "vocab_size": shape.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_length": checkpoint.config.max_length,
        "tied_lm_head": bool(getattr(model.causal_lm.config, "tie_word_embeddings", False)),
        "parameters": parameters,
    }


def _write_side_files(checkpoint: Checkpoint, model: PrefixConditioningVLM, out: Path, layout: str, shape: graphs.DecoderShape, prefix_length: int) -> None:
    tokenizer = copy.deepcopy(checkpoint.tokenizer)  # the transformers.js layout adds a token to it
    image_token_id = library_configs.add_image_token(tokenizer, shape.vocab_size) if layout == "transformers.js" else None
    tokenizer.save_pretrained(str(out))
    checkpoint.preprocessor.write(out)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    eos, pad = checkpoint.tokenizer.eos_token_id, checkpoint.tokenizer.pad_token_id
    generation = {
        "max_new_tokens": checkpoint.config.max_length,
        "do_sample": False,
        "num_beams": 1,
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else eos,
        "bos_token_id": None,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if layout == "distilvit":
        library_configs.write_language_model_configs(out, checkpoint, model.causal_lm, generation)
    elif image_token_id is not None:
        library_configs.write_transformers_js_configs(out, checkpoint, model.causal_lm, image_token_id, prefix_length)


def _export_graphs(
    model: PrefixConditioningVLM, layout: str, shape: graphs.DecoderShape, out: Path, opset: int, step: Callable[[str], None]
) -> tuple[int, dict[str, dict]]:
    """Trace and write every component's graphs into `out`; returns the prefix length and each
    graph's signature.

    Memory: the graphs are traced without their weights, which are then streamed from the
    PyTorch tensors into the files (onnx_io), and each component's weights are released once
    its last graph is written — so the peak holds the model once, shrinking as it goes.
    """
    files = LAYOUTS[layout]
    modules = _component_graphs(model, layout, shape)
    with torch.no_grad():  # with autograd on, the example activations would keep every layer's intermediates
        inputs = {name: _example_inputs(name, module, model, shape) for name, module in modules.items()}
    tied = {id(model.causal_lm.get_input_embeddings().weight)}  # the head reads the embedding
    for component in (model.vision_encoder, model.projection, model.causal_lm):
        store_linear_weights_transposed(component, keep=tied)
    release_freed_memory()
    owners = {name: model.causal_lm if name not in ("vision_encoder", "projection") else getattr(model, name) for name in modules}
    prefix_length = 0
    signatures: dict[str, dict] = {}
    for index, (name, module) in enumerate(modules.items()):
        step(f"exporting {name}")
        args = inputs.pop(name)
        # The graphs attend with ONNX Attention nodes (opset 23) or without copying the KV
        # cache (18-22); the smoke parity compares them with the model's own eager attention.
        with export_attention(owners[name], fused=opset >= FUSED_OPSET), torch.no_grad():
            graph, weights = trace_graph(module, args, opset)
            results = module(*args)
        results = results if isinstance(results, tuple) else (results,)
        shapes = dict(zip(module.input_names + module.output_names, [tuple(t.shape) for t in (*args, *results)]))
        signatures[name] = write_graph(graph, weights, out / files[name], module.dynamic_axes, shapes)
        del graph, weights
        prefix_output = next((n for n in ("projected_prefix", "image_features") if n in shapes), None)
        if prefix_output is not None:
            prefix_length = int(shapes[prefix_output][1])
        if all(owners[later] is not owners[name] for later in list(modules)[index + 1 :]):
            owners[name].to("meta")  # the weights go; module tree and shapes stay
            release_freed_memory()
    return prefix_length, signatures


def export_bundle(
    model_dir: Path,
    output_dir: Path,
    layout: str = "distilvit",
    opset: int | None = None,
    force: bool = False,
    verify: bool = True,
    allow_pickle: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Merge LoRA (verified), export every component, write side files and manifest, verify.

    Raises:
        UsageError: unknown layout or opset, occupied or unwritable output.
        CheckpointError: the checkpoint cannot be loaded.
        ParityError: merge or smoke parity out of tolerance (nothing is left at output_dir).
        BundleError: a graph fails the ONNX checker or cannot be loaded.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}", f"use one of: {', '.join(LAYOUTS)}")
    opset = opset or DEFAULT_OPSET
    if opset not in OPSETS:
        raise UsageError(f"opset {opset} is not supported", f"use an opset from {OPSETS.start} to {OPSETS.stop - 1}")
    check_output_dir(output_dir, force)
    step = on_step or (lambda message: None)
    started = time.perf_counter()
    step("loading checkpoint")
    checkpoint = load_checkpoint(model_dir, allow_pickle)
    fp32 = profile_named("fp32")  # the merge's and the smoke parity's bounds (read first: a broken file fails fast)
    step("merging LoRA")
    merge = verified_merge(checkpoint, merge_bounds(fp32))  # in place: no second copy of the model
    model = checkpoint.model
    shape = graphs.decoder_shape(model.causal_lm)
    files = LAYOUTS[layout]
    parameters = _parameter_counts(model)  # now: released weights (on meta) are no longer tied
    recorded = None
    if verify:  # recorded now: the PyTorch weights are released as their graphs are written
        pixels = checkpoint.preprocessor(sample_images(1, checkpoint.preprocessor.height))
        recorded = record_reference(TorchRunner(model), pixels)
    with atomic_output_dir(output_dir, force) as tmp:
        prefix_length, signatures = _export_graphs(model, layout, shape, tmp, opset, step)
        step("writing tokenizer, configs and manifest")
        _write_side_files(checkpoint, model, tmp, layout, shape, prefix_length)
        versions = {lib: version(lib) for lib in LIBRARIES}
        manifest = Manifest(layout, opset, _model_facts(checkpoint, model, shape, prefix_length, parameters), versions)
        manifest.variants["fp32"] = dict(files)
        for name, relative in files.items():
            manifest.describe_file(tmp, relative, component=name, variant="fp32", **signatures[name])
        # Side files, and any `<graph>.onnx_data` written for graphs over 2 GB.
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            if path.relative_to(tmp).as_posix() not in manifest.files:
                manifest.describe_file(tmp, path.relative_to(tmp).as_posix())
        manifest.write(tmp)
        smoke: list[Measurement] = []
        if recorded is not None:
            step("verifying (onnx.checker, onnxruntime, smoke parity)")
            smoke = verify_bundle(tmp, recorded, fp32)
        graph_bytes = {rel: (tmp / rel).stat().st_size for rel in files.values()}
        bundle_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return ExportResult(
        path=output_dir,
        layout=layout,
        files=graph_bytes,
        parameters=parameters,
        parameter_bytes=4 * sum(parameters.values()),
        bundle_bytes=bundle_bytes,
        seconds=time.perf_counter() - started,
        smoke=smoke,
        merge=merge,
    )
