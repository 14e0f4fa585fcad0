"""bench: PyTorch and each ONNX variant side by side, each in its own process; errors exit 2."""
# ruff: noqa: F811 — `export_tiny` is test_export's session fixture, imported to share its bundles

from __future__ import annotations

import json

import pytest
from test_export import export_tiny  # noqa: F401

from vlmexport.bundle.manifest import read_manifest
from vlmexport.cli import main
from vlmexport.runtime.bench import TORCH, BackendBench, BenchReport, derive, memory_bandwidth, run_bench

CHECKPOINT = "llama-siglip_vision_model-linear"


def test_bench_rows_cover_pytorch_and_the_variant_with_consistent_numbers(export_tiny, make_checkpoint) -> None:
    bundle = export_tiny("compact")
    report = run_bench(bundle, make_checkpoint(CHECKPOINT), ["fp32"], tokens=3, repeats=1, threads=1, isolate=False)
    assert [r.backend for r in report.rows] == [TORCH, "onnx fp32"]
    assert report.tokens == 3 and report.prefix_length == 16 and report.threads == 1 and report.bandwidth_gbs > 0.1
    torch_row, onnx_row = report.rows
    assert torch_row.speedup == 1.0 and onnx_row.speedup == pytest.approx(torch_row.caption_ms / onnx_row.caption_ms)
    for row in report.rows:
        for name in ("load_s", "vision_ms", "first_pass_ms", "decode_ms", "caption_ms", "peak_rss_mb", "size_mb", "decoder_mb", "bound_ms"):
            assert getattr(row, name) > 0, (row.backend, name)
        assert row.bound_ms == pytest.approx(row.decoder_mb / 1e3 / report.bandwidth_gbs * 1e3)
    manifest = read_manifest(bundle)
    assert onnx_row.size_mb * 1e6 == sum(f["size"] for f in manifest.files.values() if f.get("variant") == "fp32")
    # The decoder's fp32 weights, the tied head once, on both sides (the graph folds or adds a few constants).
    decoder_params = manifest.model["parameters"]["decoder"]
    assert torch_row.decoder_mb * 1e6 == 4 * decoder_params
    assert onnx_row.decoder_mb * 1e6 == pytest.approx(4 * decoder_params, rel=0.05)


def _row(backend: str, vision: float, first: float, decode: float, caption: float, decoder_mb: float) -> BackendBench:
    return BackendBench(backend, 1.0, vision, first, decode, caption, 100.0, 50.0, decoder_mb, decoder_mb)


def issue_12_rows() -> list[BackendBench]:
    """Numbers of issue #12's kind: an int8 whose two 196-row stages take most of the 1.8× budget."""
    return [_row(TORCH, 266, 391, 67, 2628, 919), _row("onnx fp32", 198, 263, 18, 1039, 538), _row("onnx int8", 226, 212, 11.4, 808, 159)]


def test_the_caption_floor_is_vision_and_first_pass_plus_every_step_at_the_bound() -> None:
    rows = issue_12_rows()
    pytorch, fp32, int8 = derive(rows, tokens=30, bandwidth=34e9)
    assert int8.bound_ms == pytest.approx(159e6 / 34e9 * 1e3)
    assert int8.floor_ms == pytest.approx(226 + 212 + 29 * int8.bound_ms)
    assert int8.vs_fp32 == pytest.approx(1039 / 808) and fp32.vs_fp32 == 1.0 and pytorch.speedup == 1.0
    assert int8.floor_vs_fp32 == pytest.approx(1039 / int8.floor_ms) and 1.8 < int8.floor_vs_fp32 < 1.85
    assert int8.speedup == pytest.approx(2628 / 808)
    # Without fp32 in the run there is nothing to compare with: 0, not a made-up ratio.
    assert all(r.vs_fp32 == r.floor_vs_fp32 == 0 for r in derive([rows[0], rows[2]], tokens=30, bandwidth=34e9))


def test_bench_prints_each_variants_ratio_to_fp32_and_its_ceiling(tmp_path, capsys, monkeypatch) -> None:
    import vlmexport.runtime.bench as bench_module

    rows = issue_12_rows()
    report = BenchReport(derive(rows, tokens=30, bandwidth=34e9), 30, 196, 2, 34.0)
    monkeypatch.setattr(bench_module, "run_bench", lambda *args: report)
    assert main(["bench", "--onnx-dir", str(tmp_path), "--model-dir", str(tmp_path)]) == 0  # run_bench is the stand-in's
    out = " ".join(capsys.readouterr().out.split())
    assert "int8: a caption 1.29× as fast as onnx fp32's; at most 1.81× with every decode step at the bound (226 ms vision + 212 ms first pass + 29 × 4.68 ms)" in out
    assert "fp32: a caption" not in out


def test_each_backend_runs_in_a_fresh_process_whose_peak_rss_is_its_own() -> None:
    import os

    from vlmexport.runtime import bench as bench_module

    child_pid = bench_module._run(os.getpid, (), isolate=True)
    child_peak = bench_module._run(bench_module._peak_rss_mb, (), isolate=True)
    assert child_pid != os.getpid()
    # This test process has torch and models loaded; a fresh interpreter has not.
    assert 0 < child_peak < bench_module._peak_rss_mb()


def _in_process(monkeypatch) -> None:
    import vlmexport.runtime.bench as bench_module

    real = bench_module.run_bench
    monkeypatch.setattr(bench_module, "run_bench", lambda *args: real(*args, isolate=False))


def test_bench_command_prints_json(export_tiny, make_checkpoint, capsys, monkeypatch) -> None:
    _in_process(monkeypatch)
    code = main(["bench", "--onnx-dir", str(export_tiny("distilvit")), "--model-dir", str(make_checkpoint(CHECKPOINT)), "--tokens", "2", "--repeats", "1", "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in report["rows"]] == [TORCH, "onnx fp32"]
    for row in report["rows"]:
        assert row["peak_rss_mb"] >= row["base_rss_mb"] > 0
        assert row["caption_ms"] > 0 and row["speedup"] > 0


def test_bench_table_names_every_column(export_tiny, make_checkpoint, capsys, monkeypatch) -> None:
    _in_process(monkeypatch)
    code = main(["bench", "--onnx-dir", str(export_tiny("compact")), "--model-dir", str(make_checkpoint(CHECKPOINT)), "--tokens", "2", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("pytorch", "onnx fp32", "vision ms", "first pass ms", "ms/token", "caption ms", "speed-up", "peak RSS MB", "bound ms/token", "memory bandwidth"):
        assert word in out, word


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "fp32,int8"], "variant 'int8' is not in this bundle"),
        (["--tokens", "0"], "--tokens and --repeats must be at least 1"),
    ],
)
def test_bad_bench_options_exit_2_before_anything_runs(export_tiny, make_checkpoint, capsys, args, message) -> None:
    code = main(["bench", "--onnx-dir", str(export_tiny("compact")), "--model-dir", str(make_checkpoint(CHECKPOINT)), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bench_without_a_checkpoint_exits_2(export_tiny, capsys) -> None:
    assert main(["bench", "--onnx-dir", str(export_tiny("compact"))]) == 2
    assert "needs --model-dir" in capsys.readouterr().err


def test_memory_bandwidth_is_a_plausible_rate() -> None:
    rate = memory_bandwidth(threads=2, nbytes=32 << 20, repeats=2)
    assert 1e8 < rate < 1e13  # bytes per second: between a slow disk and far beyond any DRAM


def test_decode_floor_times_the_steps_own_weight_matmuls_and_attention(export_tiny, tmp_path) -> None:
    # bench/decode_floor.py: the evidence behind "the runtime, not the graph, sets the int8 floor".
    import shutil
    import sys
    from pathlib import Path

    import onnx

    from vlmexport.quantize.quantize import quantize_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from decode_floor import measure_floor, weight_matmuls

    bundle = tmp_path / "onnx"
    shutil.copytree(export_tiny("compact"), bundle)
    quantize_bundle(bundle, "int8", verify=False)
    decoder = onnx.load(str(bundle / "decoder/model_int8.onnx"))
    alone = weight_matmuls(decoder)
    count = [n.op_type for n in decoder.graph.node].count("MatMulNBits")
    assert count > 0 and [n.op_type for n in alone.graph.node].count("MatMulNBits") == count
    floor = measure_floor(bundle, "int8", threads=1, past=20, runs=20)
    assert set(floor.medians_ms) == {"step", "matmuls", "attention", "matmuls + attention"}
    assert all(ms > 0 for ms in floor.medians_ms.values())
    assert floor.bound_ms == pytest.approx(floor.weight_mb / floor.bandwidth_gbs)


def test_matmul_rows_times_every_variants_weight_matmuls_at_each_row_count(export_tiny, tmp_path, capsys) -> None:
    # bench/matmul_rows.py: the evidence behind "on AVX2 int8 is slower than fp32" (README, docs/fidelity.md).
    import shutil
    import sys
    from pathlib import Path

    import onnx

    from vlmexport.quantize.quantize import quantize_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from decode_floor import weight_matmuls
    from matmul_rows import main

    bundle = tmp_path / "onnx"
    shutil.copytree(export_tiny("compact"), bundle)
    quantize_bundle(bundle, "int8", verify=False)
    # Nodes the recipe keeps float (weights stored float16, cast at load) are timed too.
    decoder = onnx.load(str(bundle / "decoder/model_int8.onnx"))
    casts = {out for n in decoder.graph.node if n.op_type == "Cast" for out in n.output}
    kept = sum(n.op_type == "MatMul" and n.input[1] in casts for n in decoder.graph.node)
    alone = weight_matmuls(decoder)
    assert kept > 0 and [n.op_type for n in alone.graph.node].count("MatMul") >= kept
    sys.argv = ["matmul_rows.py", "--onnx-dir", str(bundle), "--variants", "fp32,int8", "--rows", "5,1", "--runs", "5", "--threads", "1"]
    assert main() == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ")
    for component in ("vision_encoder", "decoder"):
        for rows in ("5 rows", "1 row"):
            assert f"{component}: " in out and rows in out
    # Four sections (2 components × 2 row counts), each with fp32 as its own base and every variant
    # timed; another variant may also land on 1.00 × by chance, so only fp32's line is matched.
    lines = out.splitlines()
    assert sum(line.split()[:1] == ["fp32"] and line.endswith("1.00 × fp32") for line in lines) == 4
    assert sum(line.split()[:1] == ["int8"] for line in lines) == 4 and out.count("dynamic ") == 4
    sys.argv = ["matmul_rows.py", "--onnx-dir", str(bundle), "--variants", "q4"]
    assert main() == 2


def test_text_fidelity_teacher_forces_every_variant_on_prose_chunks(export_tiny, tmp_path, capsys) -> None:
    # bench/text_fidelity.py: the evidence behind "on English text int8 meets the 0.01 goal" (docs/fidelity.md).
    import shutil
    import sys
    from pathlib import Path

    from vlmexport.quantize.quantize import quantize_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from text_fidelity import CHUNK, main, prose

    assert len(prose()) > 100 and not any("::=" in p for p in prose())
    bundle = tmp_path / "onnx"
    shutil.copytree(export_tiny("compact"), bundle)
    quantize_bundle(bundle, "int8", verify=False)
    sys.argv = ["text_fidelity.py", "--onnx-dir", str(bundle), "--modes", "fp32,int8,q4", "--chunks", "3"]
    assert main() == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "of " in line}
    assert set(rows) == {"fp32", "int8"}  # q4 was not written: no row
    assert float(rows["fp32"][1]) == 0.0 and float(rows["int8"][1]) > 0.0
    assert f"of {3 * CHUNK} " in rows["int8"][2]


def test_bench_refuses_a_checkpoint_of_another_model_before_measuring(export_tiny, make_checkpoint, capsys, monkeypatch) -> None:
    import vlmexport.runtime.bench as bench_module

    monkeypatch.setattr(bench_module, "measure_torch", lambda *args: pytest.fail("measured before refusing"))
    other = make_checkpoint("gpt2-siglip_vision_model-linear", text="gpt2")
    code = main(["bench", "--onnx-dir", str(export_tiny("distilvit")), "--model-dir", str(other), "--tokens", "2", "--repeats", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "not the model the bundle was exported from" in err and "text_type llama vs gpt2" in err and len(err.strip().splitlines()) == 1


def test_ulp_sensitivity_compares_each_variant_with_fp32_a_nudge_and_an_emulated_cpu(export_tiny, tmp_path, capsys) -> None:
    # bench/ulp_sensitivity.py: the evidence behind "one ulp re-draws an 8-bit variant's noise" (fidelity.nudged).
    import shutil
    import sys
    from pathlib import Path

    from vlmexport.quantize.quantize import quantize_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from ulp_sensitivity import main

    bundle = tmp_path / "onnx"
    shutil.copytree(export_tiny("compact"), bundle)
    quantize_bundle(bundle, "int8", verify=False)
    emulate = ["--emulate", "Haswell"] if shutil.which("qemu-x86_64") else []  # tests/install-deps.sh installs it
    sys.argv = ["ulp_sensitivity.py", "--onnx-dir", str(bundle), *emulate]
    assert main() == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ")
    rows = {(line.split(" | ")[0][2:], line.split(" | ")[1]): [float(c) for c in line.rstrip(" |").split(" | ")[2:]] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == {(v, s) for v in ("fp32", "int8") for s in ("vision", "prefix", "logits")}
    assert all(len(cells) == 2 + bool(emulate) for cells in rows.values())
    for stage in ("vision", "prefix", "logits"):
        assert rows["fp32", stage][0] == 0 and rows["fp32", stage][1] < 1e-4  # fp32 against itself; one ulp barely moves it
        assert rows["int8", stage][0] > 1e-4  # the quantization error
        if emulate:
            assert rows["fp32", stage][2] < 1e-4  # float kernels of another ISA: ulps
    bad = [["--stages", "vision,nope"]] + ([["--stages", "vision", "--variants", "fp32", "--emulate", "NoSuchCpu"]] if emulate else [])
    for args in bad:
        sys.argv = ["ulp_sensitivity.py", "--onnx-dir", str(bundle), *args]
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 2
    assert not emulate or "unable to find CPU model 'NoSuchCpu'" in capsys.readouterr().err
