"""export: both layouts, every architecture, the contract's names and axes, determinism,
the tied head stored once, zero-length feeds, and every error case."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import MANIFEST_NAME, read_manifest
from vlmexport.bundle.names import past_names
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.cli import main
from vlmexport.exporter.export import DEFAULT_OPSET, export_bundle
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.generate import greedy
from vlmexport.samples import sample_images


@pytest.fixture(scope="session")
def export_tiny(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: an exported bundle per (layout, text, vision, projection, opset), built once per session."""
    built: dict[tuple[object, ...], Path] = {}

    def build(
        layout: str = "distilvit", text: str = "llama", vision: str = "siglip_vision_model", projection: str = "linear", opset: int = DEFAULT_OPSET
    ) -> Path:
        key = (layout, text, vision, projection, opset)
        if key not in built:
            ckpt = make_checkpoint(f"{text}-{vision}-{projection}", text=text, vision=vision, projection=projection)
            out = tmp_path_factory.mktemp("bundle") / "onnx"
            result = export_bundle(ckpt, out, layout=layout, opset=opset)
            assert result.smoke and all(m.passed for m in result.smoke)
            built[key] = out
        return built[key]

    return build


def _graph(bundle: Path, relative: str) -> onnx.ModelProto:
    return onnx.load(str(bundle / relative))


def _declared(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("opset", [18, 23])  # decomposed attention; Attention + RotaryEmbedding ops
@pytest.mark.parametrize("layout", ["distilvit", "compact"])
@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2", "gpt2", "opt"])
def test_greedy_tokens_from_the_bundle_equal_pytorch_lora_model(export_tiny, make_checkpoint, layout: str, text: str, opset: int) -> None:
    bundle_dir = export_tiny(layout, text, opset=opset)
    checkpoint = load_checkpoint(make_checkpoint(f"{text}-siglip_vision_model-linear", text=text))
    pixels = checkpoint.preprocessor(sample_images(3, 32))
    expected = generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, DecodeOptions(max_new_tokens=8))
    bundle = open_bundle(bundle_dir)
    got = greedy(bundle, bundle.prefix(pixels), 8, checkpoint.tokenizer.eos_token_id, checkpoint.tokenizer.pad_token_id)
    assert got == expected
    assert len({tuple(t) for t in expected}) > 1, "tokens should differ between images, or the test proves little"


@pytest.mark.parametrize(("vision", "projection"), [("vit", "mlp"), ("clip_vision_model", "linear")])
def test_vit_clip_and_mlp_projection_export_and_match(export_tiny, make_checkpoint, vision: str, projection: str) -> None:
    bundle_dir = export_tiny("compact", "llama", vision, projection)
    checkpoint = load_checkpoint(make_checkpoint(f"llama-{vision}-{projection}", vision=vision, projection=projection))
    pixels = checkpoint.preprocessor(sample_images(2, 32))
    bundle = open_bundle(bundle_dir)
    got = greedy(bundle, bundle.prefix(pixels), 8, checkpoint.tokenizer.eos_token_id, checkpoint.tokenizer.pad_token_id)
    assert got == generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, DecodeOptions(max_new_tokens=8))


def test_distilvit_layout_names_dtypes_and_axes_follow_the_contract(export_tiny) -> None:
    bundle = export_tiny("distilvit")
    model = read_manifest(bundle).model
    layers, heads, dim = model["num_layers"], model["kv_heads"], model["head_dim"]
    vision = _graph(bundle, "vision_encoder/model.onnx").graph
    assert [v.name for v in vision.input] == ["pixel_values"]
    assert _declared(vision.input[0]) == ["batch_size", 3, 32, 32]
    assert _declared(vision.output[0]) == ["batch_size", 16, 32]
    projection = _graph(bundle, "projection.onnx").graph
    assert [v.name for v in projection.input] == ["vision_hidden_states"]
    assert [v.name for v in projection.output] == ["projected_prefix"]
    presents = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    prefix_init = _graph(bundle, "prefix_init.onnx").graph
    assert [v.name for v in prefix_init.input] == ["prefix_embeddings", "input_ids"]
    assert [v.name for v in prefix_init.output] == ["logits", *presents]
    assert prefix_init.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    lm = _graph(bundle, "language_model/model.onnx").graph
    assert [v.name for v in lm.input] == ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
    assert [v.name for v in lm.output] == ["logits", *presents]
    assert _declared(lm.input[3]) == ["batch_size", heads, "past_sequence_length", dim]
    assert _declared(lm.output[1]) == ["batch_size", heads, "past_sequence_length + sequence_length", dim]
    assert _declared(lm.input[1]) == ["batch_size", "past_sequence_length + sequence_length"]


def test_compact_layout_has_one_decoder_with_prefix_ids_mask_positions_and_past(export_tiny) -> None:
    bundle = export_tiny("compact")
    assert sorted(read_manifest(bundle).variants["fp32"]) == ["decoder", "projection", "vision_encoder"]
    assert not (bundle / "prefix_init.onnx").exists() and not (bundle / "language_model").exists()
    decoder = _graph(bundle, "decoder/model.onnx").graph
    names = [v.name for v in decoder.input]
    assert names[:4] == ["prefix_embeddings", "input_ids", "attention_mask", "position_ids"]
    assert names[4:] == past_names(read_manifest(bundle).model["num_layers"])


@pytest.mark.parametrize("layout", ["distilvit", "compact"])
def test_zero_length_prefix_ids_and_past_run_in_onnxruntime(export_tiny, layout: str) -> None:
    bundle = open_bundle(export_tiny(layout))
    prefix = bundle.prefix(np.zeros((2, 3, 32, 32), np.float32))
    logits, past = bundle.first_pass(prefix)  # T = 0, empty past
    assert logits.shape[:2] == (2, 1) and past[0].shape[2] == prefix.shape[1]
    logits, past = bundle.first_pass(prefix, np.array([[5, 6], [7, 8]]))  # prompt ids after the prefix
    assert logits.shape[:2] == (2, 3) and past[0].shape[2] == prefix.shape[1] + 2
    logits, past = bundle.step(np.array([[3], [4]]), past)  # empty prefix, one token, past
    assert logits.shape[:2] == (2, 1)
    logits, fresh = bundle.step(np.array([[3], [4]]), bundle.empty_past(2))  # empty past, no prefix
    assert logits.shape[:2] == (2, 1) and fresh[0].shape[2] == 1


def test_exporting_twice_gives_byte_identical_graphs(make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint("tiny")
    for name in ("a", "b"):
        export_bundle(ckpt, tmp_path / name, layout="compact", verify=False)
    graphs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.onnx"))
    assert graphs
    for relative in graphs:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()


def _initializer_bytes(graph: onnx.GraphProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in graph.initializer)


@pytest.mark.parametrize(("layout", "relatives"), [("compact", ["decoder/model.onnx"]), ("distilvit", ["prefix_init.onnx", "language_model/model.onnx"])])
@pytest.mark.parametrize("text", ["llama", "gpt2", "opt"])
def test_tied_lm_head_is_stored_once_per_decoder_graph(export_tiny, layout: str, relatives: list[str], text: str) -> None:
    bundle = export_tiny(layout, text)
    facts = read_manifest(bundle).model
    assert facts["tied_lm_head"]
    table = facts["vocab_size"] * facts["embed_dim"]
    for relative in relatives:
        graph = _graph(bundle, relative).graph
        tables = [tuple(i.dims) for i in graph.initializer if np.prod(i.dims) == table]
        assert tables == [(facts["vocab_size"], facts["embed_dim"])], relative
        # Every decoder parameter at most once: a second copy of the head would add 4 * table bytes.
        assert _initializer_bytes(graph) < 4 * facts["parameters"]["decoder"] + 4 * table // 2, relative


def test_manifest_lists_every_file_with_hash_size_and_signature(export_tiny) -> None:
    bundle = export_tiny("distilvit")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    for name in ("tokenizer.json", "preprocessor_config.json", "config.json", "generation_config.json"):
        assert name in on_disk
    graph = manifest["files"]["prefix_init.onnx"]
    assert graph["variant"] == "fp32" and len(graph["sha256"]) == 64 and graph["inputs"][0]["name"] == "prefix_embeddings"
    assert set(manifest["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "vlmexport"}
    assert manifest["variants"] == {"fp32": {k: v for k, v in manifest["variants"]["fp32"].items()}}


def test_inspect_verifies_hashes_and_names_a_changed_file(export_tiny, tmp_path: Path, capsys) -> None:
    import shutil

    bundle = shutil.copytree(export_tiny("distilvit"), tmp_path / "b")
    assert main(["inspect", str(bundle)]) == 0
    assert "past_key_values.0.key" in capsys.readouterr().out
    with (bundle / "projection.onnx").open("r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x00" * 8)
    assert main(["inspect", str(bundle)]) == 2
    assert "projection.onnx" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "flat"], "unknown layout"),
        (["--opset", "13"], "opset 13"),
    ],
)
def test_bad_export_options_exit_2_with_one_line(make_checkpoint, tmp_path: Path, capsys, args, message) -> None:
    code = main(["export", "--model-dir", str(make_checkpoint("tiny")), "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_occupied_output_is_refused_without_force_and_replaced_with_it(make_checkpoint, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--model-dir", str(make_checkpoint("tiny")), "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", "--model-dir", str(make_checkpoint("tiny")), "--output-dir", str(out), "--force", "--layout", "compact"]) == 0
    assert not (out / "keep.txt").exists() and (out / "decoder" / "model.onnx").is_file()


def test_unwritable_target_exits_2(make_checkpoint, tmp_path: Path, capsys) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/vlmexport-test/onnx")  # root can write anywhere but /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "onnx"
    assert main(["export", "--model-dir", str(make_checkpoint("tiny")), "--output-dir", str(target)]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_interrupted_export_leaves_no_half_bundle(make_checkpoint, tmp_path: Path, monkeypatch) -> None:
    import vlmexport.exporter.export as export_module

    calls = []
    real = export_module.write_graph

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "write_graph", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(make_checkpoint("tiny"), tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_smoke_parity_failure_exits_1_and_writes_nothing(make_checkpoint, tmp_path: Path, monkeypatch, capsys) -> None:
    """A graph whose weights drift after tracing must fail the end-of-export parity check."""
    import vlmexport.exporter.export as export_module

    real = export_module.write_graph

    def corrupt(graph, weights, path, *args, **kwargs):
        described = real(graph, weights, path, *args, **kwargs)
        if path.name == "projection.onnx":
            model = onnx.load(str(path))
            weight = max(model.graph.initializer, key=lambda i: np.prod(i.dims))
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
            onnx.save(model, str(path))
        return described

    monkeypatch.setattr(export_module, "write_graph", corrupt)
    code = main(["export", "--model-dir", str(make_checkpoint("tiny")), "--output-dir", str(tmp_path / "o")])
    assert code == 1
    assert "projection" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_graphs_over_the_size_limit_use_external_data_listed_in_the_manifest(make_checkpoint, tmp_path: Path, monkeypatch) -> None:
    import vlmexport.exporter.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "TWO_GB", 100_000)  # every tiny decoder graph is "over the limit"
    out = tmp_path / "onnx"
    export_bundle(make_checkpoint("tiny"), out, layout="compact")
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert "decoder/model.onnx_data" in files and files["decoder/model.onnx_data"]["size"] > 100_000
    assert (out / "decoder" / "model.onnx").stat().st_size < 100_000
    assert "projection.onnx_data" not in files  # small graphs stay single files
    bundle = open_bundle(out)
    assert bundle.first_pass(bundle.prefix(np.zeros((1, 3, 32, 32), np.float32)))[0].shape[1] == 1


@pytest.mark.parametrize("fused", [False, True])
def test_export_attention_equals_eager_attention_on_a_gqa_decoder(make_checkpoint, fused: bool) -> None:
    # What PyTorch computes while tracing is what the smoke parity then holds the graph to, so
    # both implementations must compute eager attention (and transformers' rotary) themselves.
    import torch

    from vlmexport.exporter.attention import export_attention, has_grouped_kv

    lm = load_checkpoint(make_checkpoint("llama-siglip_vision_model-linear", text="llama")).model.causal_lm
    assert has_grouped_kv(lm.config)
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = lm(input_ids=ids).logits
        with export_attention(lm, fused=fused):
            assert lm.config._attn_implementation != "eager"
            grouped = lm(input_ids=ids).logits
    assert lm.config._attn_implementation == "eager", "the model's own attention is restored"
    from transformers.models.llama import modeling_llama

    assert modeling_llama.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb", "transformers' rotary is restored"
    assert torch.allclose(grouped, eager, atol=1e-5)
    assert (grouped - eager).abs().max() < 1e-5 < (eager[:, 1:] - eager[:, :-1]).abs().max()


@pytest.mark.parametrize("layout", ["distilvit", "compact"])
def test_gqa_decoder_graphs_do_not_copy_kv_heads(export_tiny, layout: str) -> None:
    # transformers' repeat_kv would be one Expand per key and per value in every layer.
    bundle = export_tiny(layout, opset=18)
    layers = read_manifest(bundle).model["num_layers"]
    for relative in _decoder_graphs(bundle):
        expands = [n for n in _graph(bundle, relative).graph.node if n.op_type == "Expand"]
        assert len(expands) < 2 * layers, relative


@pytest.mark.parametrize(("text", "rotary"), [("llama", 2), ("mistral", 2), ("qwen2", 2), ("gpt2", 0), ("opt", 0)])
def test_opset_23_graphs_attend_with_one_attention_node_per_layer(export_tiny, text: str, rotary: int) -> None:
    bundle = export_tiny("distilvit", text, opset=23)
    manifest = read_manifest(bundle)
    layers = manifest.model["num_layers"]
    assert manifest.opset == 23
    for relative in _decoder_graphs(bundle):
        model = _graph(bundle, relative)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)], relative
        ops = [n.op_type for n in model.graph.node]
        assert (ops.count("Attention"), ops.count("RotaryEmbedding"), ops.count("Softmax")) == (layers, rotary * layers, 0), relative
        # attention_layout.py: 3-D projections in, the cache in and out, nothing around them. For
        # GPT-2 only since its Conv1D traces as a MatMul (memory.py) and, in the first pass of
        # GPT-2 and OPT, since the fold sizes the position ids' Range (simplify.py).
        attentions = [n for n in model.graph.node if n.op_type == "Attention"]
        assert all(len(n.input) == 6 and len(n.output) == 3 for n in attentions), relative
        assert not _transposed_around_attention(model), relative
    vision = _graph(bundle, "vision_encoder/model.onnx")
    ops = [n.op_type for n in vision.graph.node]
    assert ops.count("Attention") > 0 and "Softmax" not in ops and not _transposed_around_attention(vision)


@pytest.mark.parametrize("vision", ["vit", "clip_vision_model"])
def test_opset_23_vision_encoders_of_every_kind_attend_without_transposes(export_tiny, vision: str) -> None:
    # SigLIP is covered above.
    model = _graph(export_tiny("distilvit", "llama", vision, opset=23), "vision_encoder/model.onnx")
    attentions = [n for n in model.graph.node if n.op_type == "Attention"]
    assert attentions and all(len(n.input) == 3 for n in attentions) and not _transposed_around_attention(model)


def _transposed_around_attention(model: onnx.ModelProto) -> list[str]:
    """Transposes, Reshapes and Concats that feed an Attention node or read its output, through
    RotaryEmbedding."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "Attention":
            continue
        feeding = [producer.get(name) for name in node.input]
        feeding += [producer.get(n.input[0]) for n in feeding if n is not None and n.op_type == "RotaryEmbedding"]
        reading = [n for n in model.graph.node if node.output[0] in n.input]
        found += [n.name for n in [*feeding, *reading] if n is not None and n.op_type in ("Transpose", "Reshape", "Concat")]
    return found


def test_rotary_op_refuses_what_onnx_rotaryembedding_cannot_express() -> None:
    import torch

    from vlmexport.errors import UsageError
    from vlmexport.exporter.attention import onnx_rotary

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(UsageError, match="--opset 18"):
        onnx_rotary(q, q, torch.randn(1, 3, 4), torch.randn(1, 3, 4))  # partial rotary: 4 of 8 dims


def _decoder_graphs(bundle: Path) -> list[str]:
    return [r for r in read_manifest(bundle).variants["fp32"].values() if "vision" not in r and "projection" not in r]


def test_linear_weights_are_exported_as_the_parameters_themselves(export_tiny) -> None:
    # Stored transposed before tracing, a Linear's MatMul reads `<module>.weight` ([in, out])
    # instead of a constant-folded transposed copy (`onnx::MatMul_*`).
    # Projections of one activation are one MatMul over their weights side by side (fuse.py).
    graph = _graph(export_tiny("compact"), "decoder/model.onnx").graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    assert inits["lm.model.layers.0.mlp.down_proj.weight"] == (96, 48)
    assert inits["lm.model.layers.0.mlp.gate_proj+up_proj.weight"] == (48, 2 * 96)
    assert inits["lm.model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"] == (48, 48 + 24 + 24)  # 2 of 4 heads for k, v
    assert not [name for name in inits if name.startswith("onnx::MatMul")]


def test_fused_projection_weights_are_the_checkpoints_side_by_side(export_tiny, make_checkpoint) -> None:
    graph = _graph(export_tiny("compact"), "decoder/model.onnx").graph
    fused = numpy_helper.to_array(next(i for i in graph.initializer if i.name == "lm.model.layers.1.self_attn.q_proj+k_proj+v_proj.weight"))
    from vlmexport.checkpoint.merge import merged_model

    lm = merged_model(load_checkpoint(make_checkpoint("llama-siglip_vision_model-linear", text="llama")).model).causal_lm
    attention = lm.model.layers[1].self_attn
    expected = np.concatenate([m.weight.detach().numpy().T for m in (attention.q_proj, attention.k_proj, attention.v_proj)], axis=1)
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    layers = read_manifest(export_tiny("compact")).model["num_layers"]
    ops = [n.op_type for n in graph.node]
    assert (ops.count("MatMul"), ops.count("Split")) == (4 * layers + 1, 2 * layers)  # qkv, o, gate+up, down; head


def test_fusion_leaves_alone_what_it_cannot_fuse_and_keeps_the_outputs() -> None:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from vlmexport.exporter.fuse import fuse_parallel_matmuls

    rng = np.random.default_rng(0)
    weights = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in
               {"a.q.w": (4, 3), "a.k.w": (4, 5), "a.v.w": (4, 2), "shared.w": (4, 4), "b.w": (6, 3)}.items()}  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "a.q.w"], ["q"], name="/a/q/MatMul"),
        helper.make_node("MatMul", ["x", "a.k.w"], ["k"], name="/a/k/MatMul"),
        helper.make_node("MatMul", ["x", "shared.w"], ["s"], name="/s/MatMul"),  # its weight has another reader
        helper.make_node("Add", ["shared.w", "shared.w"], ["s2"]),
        helper.make_node("MatMul", ["x", "a.v.w"], ["v"], name="/a/v/MatMul"),
        helper.make_node("MatMul", ["y", "b.w"], ["b"], name="/b/MatMul"),  # alone on its activation
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(w.shape)) for name, w in weights.items()]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("q", "k", "s", "s2", "v", "b")]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "y": rng.standard_normal((2, 6)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, {**feeds, **{n: w.numpy() for n, w in weights.items()}})

    assert fuse_parallel_matmuls(model.graph, weights) == 1
    assert sorted(weights) == ["a.q+k+v.w", "b.w", "shared.w"]
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == ["/a/q+k+v/MatMul", "/s/MatMul", "/b/MatMul"]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {**feeds, **{n: w.numpy() for n, w in weights.items()}})
    for expected, got in zip(before, after):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("limit", [None, 1000])
def test_write_graph_streams_weights_into_a_model_onnxruntime_runs(tmp_path: Path, monkeypatch, limit: int | None) -> None:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    import vlmexport.exporter.onnx_io as onnx_io

    if limit:
        monkeypatch.setattr(onnx_io, "TWO_GB", limit)  # the external-data path
    rng = np.random.default_rng(0)
    weights = {"w": torch.tensor(rng.standard_normal((6, 40)), dtype=torch.float32), "b": torch.arange(40, dtype=torch.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, 40]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
    )
    path = tmp_path / "m.onnx"
    onnx_io.write_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weights, path, {"x": {0: "n"}, "y": {0: "n"}}, {"x": (2, 6), "y": (2, 40)})
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    assert [i.name for i in written.graph.input] == ["x"]
    assert {i.name: numpy_helper.to_array(i).tolist() for i in written.graph.initializer} == {k: v.numpy().tolist() for k, v in weights.items()}
    assert (tmp_path / "m.onnx_data").exists() == bool(limit)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weights["w"].numpy() + weights["b"].numpy(), rtol=1e-5)


def _shape_graph(kind: str) -> onnx.ModelProto:
    """x [batch_size, prefix_length, 6] → y, through traced-style shape arithmetic."""
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_scalar"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "one_scalar"], ["p"], axis=0),
    ]
    if kind in ("reshape", "view"):  # y = x.reshape(B, P, 2, 3), or x.view(B, P, -1, 3) as attention's heads
        nodes += [
            helper.make_node("Unsqueeze", ["b", "zero"], ["b1"]),
            helper.make_node("Unsqueeze", ["p", "zero"], ["p1"]),
            helper.make_node("Concat", ["b1", "p1", "two_three" if kind == "reshape" else "minus_one_three"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "prefix_length", 2, 3])
    else:  # y = x * min(P, 1): 1 for every P > 0, but 0 for an empty prefix
        nodes += [
            helper.make_node("Min", ["p", "one_scalar"], ["m"]),
            helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "mf"], ["y"]),
        ]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "prefix_length", 6])
    scalars = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero_scalar", 0), ("one_scalar", 1))]
    inits = [const("zero", [0]), const("two_three", [2, 3]), const("minus_one_three", [-1, 3]), *scalars]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "prefix_length", 6])], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("kind", ["reshape", "view", "min"])
def test_shape_arithmetic_folds_only_what_holds_for_every_size(kind: str) -> None:
    import onnxruntime as ort

    from vlmexport.exporter.simplify import fold_shape_arithmetic

    model = _shape_graph(kind)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    removed = fold_shape_arithmetic(folded)
    ops = [n.op_type for n in folded.graph.node]
    if kind in ("reshape", "view"):  # the target becomes [0, 0, 2, 3]: no shape arithmetic left
        # (for "view", the -1 beside an empty prefix has no answer and onnxruntime refuses that
        # size as traced: it is left out of the proof rather than stopping it)
        assert removed == 6 and ops == ["Reshape"]
    else:  # min(P, 1) is 1 for every P > 0 but 0 for P = 0: must stay computed
        assert "Min" in ops
    for batch, prefix in [(2, 3), (1, 0), (4, 1)]:
        x = np.random.default_rng(0).standard_normal((batch, prefix, 6)).astype(np.float32)
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, folded)]
        if kind == "view" and prefix == 0:  # as traced it fails; folded, it gives the empty answer
            with pytest.raises(Exception, match="cannot be reshaped"):
                sessions[0].run(None, {"x": x})
            assert sessions[1].run(None, {"x": x})[0].shape == (batch, 0, 2, 3)
            continue
        run = [session.run(None, {"x": x})[0] for session in sessions]
        np.testing.assert_array_equal(run[0], run[1])


def test_decoder_graphs_keep_little_shape_arithmetic(export_tiny) -> None:
    # As traced, every layer recomputes its reshape targets (8 per layer) and rotary half-width
    # from Shape nodes; folded, one target per layer stays computed (the attention output's,
    # whose input shape inference loses at batch 1) beside the mask's and the logits' own.
    # (Opset 18: at 23 the attention output comes out of one Attention node.)
    bundle = export_tiny("compact", opset=18)
    graph = _graph(bundle, "decoder/model.onnx").graph
    layers = read_manifest(bundle).model["num_layers"]
    inits = {i.name for i in graph.initializer}
    computed_targets = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] not in inits]
    shapes = [n for n in graph.node if n.op_type == "Shape"]
    assert len(computed_targets) <= layers + 2 and len(shapes) <= 2 * layers + 8, (len(computed_targets), len(shapes))
