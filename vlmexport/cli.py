"""The command line: parse arguments, call one stage function, render its result.

Errors are turned into one line and an exit code in exactly one place, `main`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from vlmexport.errors import EXIT_USAGE, VlmExportError

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts without torch
    from vlmexport.bundle.decoding import DecodeOptions
    from vlmexport.checkpoint.merge import MergeReport

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Export distilvit-style captioning models to small, verified ONNX bundles.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}
# Import names of the `export` extra (pyproject.toml): export, merge, check, synth, bench and
# quantize load them; caption --onnx-dir, serve and inspect never do (tests/test_torch_free.py).
EXPORT_EXTRA = frozenset({"torch", "transformers", "peft", "safetensors", "onnx", "onnxscript", "psutil", "gguf"})

ModelDir = Annotated[Path, typer.Option("--model-dir", help="distilvit checkpoint folder")]
OutputDir = Annotated[Path, typer.Option("--output-dir", help="folder to create")]
Force = Annotated[bool, typer.Option("--force", help="replace a non-empty output folder")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="accept pickled .bin weights (runs code from the file)")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    STATE["debug"] = debug


@app.command()
def merge(model_dir: ModelDir, output_dir: OutputDir, force: Force = False, allow_pickle: AllowPickle = False) -> None:
    """Merge LoRA adapters into the decoder, verify, and save a merged checkpoint.

    Example: vlmexport merge --model-dir ckpt --output-dir ckpt-merged
    """
    from vlmexport.checkpoint.merge import merge_checkpoint

    report = merge_checkpoint(model_dir, output_dir, force=force, allow_pickle=allow_pickle)
    out.print(f"merged → {output_dir}  ({_merge_summary(report)})")


def _merge_summary(report: MergeReport) -> str:
    """One line on a verified merge (checkpoint.merge.MergeReport): its criteria and whether greedy tokens stayed identical."""
    values = {m.metric: m for m in report.measurements}
    top1 = values["top1"]
    return (
        f"teacher-forced on {report.images} images: logits rel_max {values['rel_max'].value:.2e}, "
        f"KL {values['kl'].value:.1e} nats, top-1 {top1.value:.3g} over {top1.counted} of {top1.positions} clear positions; "
        f"greedy tokens identical: {report.tokens_identical}"
    )


@app.command()
def export(
    model_dir: ModelDir,
    output_dir: OutputDir = Path("onnx"),
    layout: Annotated[str, typer.Option("--layout", help="distilvit (what prefix_vlm.js loads), compact (no weight twice) or transformers.js (what @huggingface/transformers loads)")] = "distilvit",
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset 18-23 (default 23: ONNX Attention and RotaryEmbedding ops; 18 for older runtimes)")
    ] = None,
    force: Force = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip onnx.checker, onnxruntime load and smoke parity")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Merge LoRA and export every component to ONNX, with tokenizer, configs and a manifest.

    Example: vlmexport export --model-dir ckpt --output-dir onnx --layout compact
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlmexport.exporter.export import export_bundle

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("export", total=None)
        result = export_bundle(
            model_dir, output_dir, layout, opset, force=force, verify=not no_verify, allow_pickle=allow_pickle,
            on_step=lambda message: bar.update(task, description=message),
        )
    table = Table("file", "MB", "parameters", title=f"{result.layout} bundle → {result.path}")
    for name, size in result.files.items():
        stem = name.removeprefix("onnx/")  # the transformers.js layout's folder
        component = "decoder" if stem.startswith(("prefix_init", "language_model", "decoder")) else stem.split("/")[0].removesuffix(".onnx")
        count = result.parameters.get(component)  # none for embed_tokens: the decoder's table again
        table.add_row(name, f"{size / 1e6:.2f}", f"{count:,}" if count is not None else "")
    table.add_row("bundle total (with tokenizer, configs)", f"{result.bundle_bytes / 1e6:.2f}", "")
    table.add_row("all parameters at fp32", f"{result.parameter_bytes / 1e6:.2f}", f"{sum(result.parameters.values()):,}")
    out.print(table)
    if result.merge is not None:
        out.print(f"merge verified: {_merge_summary(result.merge)}")
    if result.smoke:
        worst = max(result.smoke, key=lambda m: m.value / m.tolerance)
        out.print(
            f"verified: {len(result.smoke)} smoke measurements pass, fp32 profile "
            f"(worst {worst.component} {worst.output} {worst.metric} {worst.value:.1e} ≤ {worst.tolerance:.0e})"
        )
    out.print(f"done in {result.seconds:.1f} s")


@app.command()
def inspect(
    onnx_dir: Annotated[Path, typer.Argument(help="bundle folder")],
    target: Annotated[str, typer.Option("--target", help="cpu, or webgpu: list per variant the ops onnxruntime-web runs without a WebGPU kernel")] = "cpu",
) -> None:
    """Show a bundle's components, signatures, sizes and variants (hashes verified).

    Example: vlmexport inspect onnx --target webgpu
    """
    from vlmexport.errors import UsageError
    from vlmexport.exporter.inspect import inspect_bundle

    if target not in ("cpu", "webgpu"):
        raise UsageError(f"unknown --target {target!r}", "use --target cpu or --target webgpu")
    if target == "webgpu":
        _inspect_webgpu(onnx_dir)
        return
    manifest, rows = inspect_bundle(onnx_dir)
    out.print(f"layout {manifest.layout}, opset {manifest.opset}, variants {', '.join(manifest.variants)}; every sha256 verified")
    table = Table("component", "variant", "file", "MB")
    for r in rows:
        table.add_row(r.component, r.variant, r.path, f"{r.size / 1e6:.2f}")
    out.print(table)
    for r in rows:
        if r.variant == "fp32":
            out.print(f"[bold]{r.component}[/bold]")
            for kind, values in (("in ", r.inputs), ("out", r.outputs)):
                for v in values:
                    out.print(f"  {kind} {v['name']}  {v['dtype']} [{', '.join(map(str, v['shape']))}]", markup=False, highlight=False)


def _inspect_webgpu(onnx_dir: Path) -> None:
    from vlmexport.site.webgpu import webgpu_fallbacks

    with err.status("placing every graph with onnxruntime-web's WebGPU backend (headless Chromium)"):
        report = webgpu_fallbacks(onnx_dir)
    table = Table("variant", "component", "file", "ops without a WebGPU kernel (nodes) → run on the CPU", title=f"{report.runtime}, adapter {report.adapter}")
    for r in report.rows:
        ops = ", ".join(f"{op} ({n})" for op, n in sorted(r.fallbacks.items())) or "none"
        table.add_row(r.variant, r.component, r.path, f"cannot start on WebGPU ({r.error}): all of it" if r.error else ops)
    Console(width=max(out.width, 150)).print(table)


@app.command()
def caption(
    images: Annotated[list[Path] | None, typer.Argument(help="image files", show_default=False)] = None,
    images_dir: Annotated[Path | None, typer.Option("--images", help="a folder of images (recursive), captioned into --output")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="with --images: JSON Lines file, one {image, caption, tokens} a line; a rerun resumes")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="with --images: worker processes (0: one per core)")] = 0,
    onnx_dir: Annotated[Path | None, typer.Option("--onnx-dir", help="ONNX bundle folder (onnx backend)")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="bundle variant: fp32 (default), int8, ...")] = None,
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="checkpoint folder (torch backend)")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="onnx or torch (default: whichever folder is given)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="default: the model's max_length")] = None,
    num_beams: Annotated[int, typer.Option("--num-beams", help="beam search with N beams")] = 1,
    length_penalty: Annotated[float | None, typer.Option("--length-penalty", help="beam score / length**P (default 1.0)")] = None,
    early_stopping: Annotated[str | None, typer.Option("--early-stopping", help="beam search: true, false (default) or never")] = None,
    no_repeat_ngram_size: Annotated[int, typer.Option("--no-repeat-ngram-size", help="never repeat an n-gram of this size")] = 0,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="sample instead of taking the most likely token")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="sampling temperature (default 1.0)")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="sample among the K most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="sample among the most likely tokens of total probability P")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="sampling seed (same seed, same captions)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Caption images with an ONNX bundle or the PyTorch model: greedy, beam search or sampling.

    Example: vlmexport caption --onnx-dir onnx --variant int8 --num-beams 3 photo.jpg
    Example: vlmexport caption --onnx-dir onnx --images photos/ --output captions.jsonl
    """
    from vlmexport.bundle.decoding import options_from_flags
    from vlmexport.errors import UsageError

    if onnx_dir is not None and model_dir is not None:
        raise UsageError("--onnx-dir and --model-dir select two different backends", "pass only one of them")
    backend = backend or ("onnx" if onnx_dir is not None else "torch")
    if backend not in ("onnx", "torch"):
        raise UsageError(f"unknown backend {backend!r}", "use --backend onnx or --backend torch")
    if (backend == "onnx") != (onnx_dir is not None) or (backend == "torch" and model_dir is None):
        raise UsageError(f"--backend {backend} needs --{'onnx' if backend == 'onnx' else 'model'}-dir", "pass the folder of that backend")
    if backend == "torch" and variant is not None:
        raise UsageError("--variant selects a bundle variant", "use it with --onnx-dir")
    options = options_from_flags(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
    )
    if (images_dir is None) == (not images):
        raise UsageError("pass image files or --images FOLDER", "one of them, not both")
    if (images_dir is None) != (output is None):
        raise UsageError("--images and --output go together", "pass both: --images FOLDER --output captions.jsonl")
    if images_dir is not None and output is not None:
        if onnx_dir is None or as_json:
            raise UsageError("--images captions with an ONNX bundle into --output", "pass --onnx-dir (and no --json: the output is JSON Lines)")
        _caption_folder(onnx_dir, images_dir, output, variant or "fp32", options, workers)
        return
    images = images or []
    if onnx_dir is not None:
        from vlmexport.runtime.caption import caption_images

        captions = caption_images(onnx_dir, images, variant or "fp32", options)
    else:  # the PyTorch reference: imported only here, so the ONNX path never loads torch
        from vlmexport.checkpoint.caption import caption_images_torch

        assert model_dir is not None  # checked above: the torch backend needs --model-dir
        captions = caption_images_torch(model_dir, images, options, allow_pickle)
    _print_captions(images, captions, as_json)


@app.command()
def check(
    onnx_dir: Annotated[Path, typer.Option("--onnx-dir", help="bundle folder")] = Path("onnx"),
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="checkpoint the bundle was exported from (default reference: the bundle's fp32)")] = None,
    variant: Annotated[str, typer.Option("--variant", help="fp32, int8, uint8, fp16 or q4")] = "fp32",
    profile: Annotated[str | None, typer.Option("--profile", help="tolerance profile in configs/tolerances/ (default: the variant's)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="tolerance profile TOML file")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="folder of images (default: bundled samples)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="caption length (default: max_length)")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the JSON report here")] = None,
) -> None:
    """Prove a bundle says what its reference says: files, every component at batch 1 and 3, captions.

    Exit 0: pass; 1: parity failure; 2: usage or integrity error.
    Example: vlmexport check --onnx-dir onnx --model-dir ckpt --json report.json
    """
    from rich import box
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlmexport.errors import UsageError
    from vlmexport.validate.check import check_bundle
    from vlmexport.validate.profiles import load_profile, profile_named
    from vlmexport.validate.report import table_rows, write_error_report, write_report

    # Where the report cannot be written, no error report can be either: refused before the try.
    if json_path is not None and not json_path.resolve().parent.is_dir():
        raise UsageError(f"--json {json_path}: folder {json_path.resolve().parent} does not exist", "create it or pick another path")
    if json_path is not None and json_path.is_dir():
        raise UsageError(f"--json {json_path} is a folder, not a file", f"name the report's file, e.g. --json {json_path / 'report.json'}")
    try:
        if profile and config:
            raise UsageError("--profile and --config were both given", "pass one: a profile name or a TOML file")
        chosen = load_profile(config) if config else profile_named(profile) if profile else None
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("check", total=None)
            report = check_bundle(
                onnx_dir, model_dir, variant, chosen, images, max_new_tokens, on_step=lambda message: bar.update(task, description=message)
            )
    except VlmExportError as exc:
        if json_path is not None:
            write_error_report(exc, json_path)  # never leave an earlier run's verdict for CI to read
        raise
    wide = out.width >= 110  # which batch/step gave the worst value: a column only where it fits
    table = Table("component", "output", "metric", "value", "threshold", "result", *(["worst at"] if wide else []), box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
    table.title = f"{report.variant} {report.layout} bundle vs {report.reference}, profile {report.profile.name}"
    for row in table_rows(report):
        result = "[green]pass[/green]" if row.passed else "[bold red]FAIL[/bold red]"
        table.add_row(row.component, row.output, row.metric, row.shown_value, row.bound, result, *([row.where] if wide else []))
    out.print(table)
    for c in [c for c in report.captions if c.first_difference is not None][:5]:
        out.print(f"{c.image}: differs at token {c.first_difference}: {c.reference_text!r} (reference) vs {c.candidate_text!r}", markup=False)
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    if json_path is not None:
        write_report(report, json_path)
    out.print(f"{'PASS' if report.passed else 'FAIL'}: {report.summary()} ({report.seconds:.1f} s)", markup=False)
    error = report.parity_error()
    if error is not None:
        raise error  # main maps it to exit code 1


@app.command()
def bench(
    onnx_dir: Annotated[Path, typer.Option("--onnx-dir", help="bundle folder")] = Path("onnx"),
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="checkpoint the bundle was exported from")] = None,
    variants: Annotated[str, typer.Option("--variants", help="comma-separated bundle variants, e.g. fp32,int8")] = "fp32",
    tokens: Annotated[int, typer.Option("--tokens", help="tokens per caption (EOS ignored)")] = 30,
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs per measurement (median)")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="threads per backend (default: all cores)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """PyTorch eager and each ONNX variant side by side: load, vision, first pass, per-token decode, caption, RSS, size.

    Example: vlmexport bench --onnx-dir onnx --model-dir ckpt --variants fp32,int8 --tokens 30
    """
    from dataclasses import asdict

    from vlmexport.errors import UsageError
    from vlmexport.runtime.bench import run_bench

    if model_dir is None:
        raise UsageError("bench compares against PyTorch and needs --model-dir", "pass the checkpoint the bundle was exported from")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    with err.status(f"benchmarking pytorch, {', '.join(names)} (each in its own process)"):
        report = run_bench(onnx_dir, model_dir, names, tokens, repeats, threads)
    if as_json:
        out.print_json(json.dumps(asdict(report)))
        return
    table = Table("backend", "load s", "vision ms", "first pass ms", "ms/token", "caption ms", "speed-up", "peak RSS MB (before load)", "size MB", "bound ms/token", "ms/token ÷ bound",
                  title=f"batch 1, {report.prefix_length}-token prefix, {report.tokens} tokens, {report.threads} threads")
    for r in report.rows:
        table.add_row(r.backend, f"{r.load_s:.2f}", f"{r.vision_ms:.1f}", f"{r.first_pass_ms:.1f}", f"{r.decode_ms:.2f}", f"{r.caption_ms:.0f}", f"{r.speedup:.2f}×",
                      f"{r.peak_rss_mb:.0f} ({r.base_rss_mb:.0f})", f"{r.size_mb:.1f}", f"{r.bound_ms:.2f}", f"{r.decode_ms / r.bound_ms:.2f}")
    Console(width=max(out.width, 150)).print(table)  # one line per backend even on a narrow terminal
    load = ", ".join(f"{x:.1f}" for x in report.load_average)
    out.print(f"memory bandwidth {report.bandwidth_gbs:.1f} GB/s (reads, all threads); bound = decoder weight bytes / bandwidth; load average {load}")
    for r in report.rows:
        if r.backend.startswith("onnx ") and r.backend != "onnx fp32" and r.vs_fp32:
            out.print(f"{r.backend.removeprefix('onnx ')}: a caption {r.vs_fp32:.2f}× as fast as onnx fp32's; at most {r.floor_vs_fp32:.2f}× with every decode step at the bound "
                      f"({r.vision_ms:.3g} ms vision + {r.first_pass_ms:.3g} ms first pass + {report.tokens - 1} × {r.bound_ms:.3g} ms)")


@app.command()
def serve(
    onnx_dir: Annotated[Path, typer.Option("--onnx-dir", help="bundle folder")] = Path("onnx"),
    host: Annotated[str, typer.Option("--host", help="address to listen on; the default serves this machine only")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port (0 picks a free one)")] = 8000,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help="another Host name to answer to (repeatable; * for any)")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="captions at once (0: one per core)")] = 0,
    queue: Annotated[int | None, typer.Option("--queue", min=0, help="requests waiting beyond those running before 503 (default: 8 per worker)")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="largest image POST /caption accepts")] = 20,
    max_megapixels: Annotated[float, typer.Option("--max-megapixels", min=0.001, help="largest image size, read from its header")] = 50,
    max_beams: Annotated[int, typer.Option("--max-beams", min=1, help="most beams a request may ask for")] = 4,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="most tokens a request may ask for (default: the model's max_length)")] = None,
    client_timeout: Annotated[float, typer.Option("--client-timeout", min=0.01, help="seconds a client has to send its request")] = 30,
    quiet: Annotated[bool, typer.Option("--quiet", help="no request log")] = False,
) -> None:
    """Serve the browser demo (ONNX Runtime Web), the bundle, and POST /caption (Python runtime).

    Example: vlmexport serve --onnx-dir onnx --port 8000
    """
    from vlmexport.serve.server import Settings, make_server

    def log(line: str) -> None:
        if not quiet:
            err.print(line, markup=False, highlight=False)

    settings = Settings(
        max_upload_bytes=int(max_upload_mb * 1e6), max_pixels=int(max_megapixels * 1e6), max_beams=max_beams,
        max_new_tokens=max_new_tokens, workers=workers, queue=queue, client_timeout=client_timeout,
    )  # fmt: skip
    server = make_server(onnx_dir, host, port, settings, log=log, allowed_hosts=allowed_host or ())
    for warning in server.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}: anyone who can reach it can use it (there is no authentication)", markup=False, highlight=False)
    out.print(f"serving {onnx_dir}: demo page {server.url}/ · API {server.url}/docs · curl -F image=@photo.png {server.url}/caption · Ctrl-C stops", markup=False, highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    out.print("stopped")


@app.command()
def site(
    onnx_dir: Annotated[Path, typer.Option("--onnx-dir", help="bundle folder")] = Path("onnx"),
    output_dir: OutputDir = Path("site"),
    force: Force = False,
    no_webgpu: Annotated[bool, typer.Option("--no-webgpu", help="leave out the WebGPU build of onnxruntime-web (29 MB less)")] = False,
) -> None:
    """Write the browser demo with the bundle as a static site (COOP/COEP by _headers or a service worker).

    Example: vlmexport site --onnx-dir onnx --output-dir site && python3 -m http.server -d site
    """
    from vlmexport.site.build import build_site

    result = build_site(onnx_dir, output_dir, force=force, webgpu=not no_webgpu)
    out.print(
        f"site → {result.path}: {result.files} files, {result.bytes / 1e6:.1f} MB ({result.bundle_bytes / 1e6:.1f} MB bundle: {', '.join(result.variants)}); "
        f"serve the folder as it is, e.g. python3 -m http.server -d {result.path}",
        markup=False, highlight=False, soft_wrap=True,
    )


@app.command()
def quantize(
    onnx_dir: Annotated[Path, typer.Option("--onnx-dir", help="bundle folder (with its fp32 variant)")] = Path("onnx"),
    mode: Annotated[str, typer.Option("--mode", help="int8, uint8 (unsigned weights, transformers.js style), fp16 or q4")] = "int8",
    components: Annotated[list[str] | None, typer.Option("--components", help="component to quantize (repeatable; default: all)")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="blockwise (MatMulNBits, default), dynamic (quantize_dynamic, int8/uint8) or hqq (q4: more accurate, slower)")] = "blockwise",
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--no-per-channel", help="--recipe dynamic: weight scales per output channel (default: measured choice per component)")] = None,
    exclude_nodes: Annotated[list[str] | None, typer.Option("--exclude-nodes", help="fnmatch pattern of node names kept in fp32 (repeatable)")] = None,
    keep_fp32: Annotated[str | None, typer.Option("--keep-fp32", help="auto: keep the fewest decoder nodes fp32 that meet the profile, by measured sensitivity")] = None,
    calibration_images: Annotated[Path | None, typer.Option("--calibration-images", help="folder of images like the ones the model will caption (recursive, up to 128 used): GPTQ's calibration instead of the bundled samples")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace the variant if the bundle has it")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the parity check against fp32")] = False,
    optimize: Annotated[bool, typer.Option("--optimize", help="apply the measured-good onnxruntime.transformers fusions first")] = False,
) -> None:
    """Write a quantized variant beside the fp32 graphs and check it against fp32 (exit 1 if it fails).

    Example: vlmexport quantize --onnx-dir onnx --mode int8
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlmexport.quantize.quantize import quantize_bundle

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("quantize", total=None)
        report = quantize_bundle(
            onnx_dir, mode, components or None, per_channel, exclude_nodes or None, force=force, verify=not no_verify,
            optimize=optimize, on_step=lambda message: bar.update(task, description=message), recipe=recipe, keep_fp32=keep_fp32,
            calibration=calibration_images,
        )  # fmt: skip
    table = Table("file", "fp32 MB", f"{mode} MB", "ratio", title=f"{mode} variant → {report.bundle}")
    for row in report.rows:
        table.add_row(row.variant_path, f"{row.fp32_bytes / 1e6:.2f}", f"{row.variant_bytes / 1e6:.2f}", f"{row.ratio:.3f}")
    table.add_row("total", f"{report.fp32_bytes / 1e6:.2f}", f"{report.variant_bytes / 1e6:.2f}", f"{report.ratio:.3f}", style="bold")
    out.print(table)
    added = sorted({op for row in report.rows for op in row.new_ops})
    out.print(f"ops beyond fp32 (listed per file in the manifest): {', '.join(added) or 'none'}", markup=False, highlight=False)
    for r in [r for r in report.activation_ranges if not r.masking][:5]:
        out.print(f"fp16 range: {r.component} {r.tensor} ({r.op_type}) peaks at {r.peak:.4g}, {r.fp16_fraction:.1%} of fp16's 65504{' → kept fp32' if r.hot else ''}", markup=False, highlight=False)
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"done in {report.seconds:.1f} s")
    if report.check is not None:
        out.print(f"{'PASS' if report.check.passed else 'FAIL'} vs fp32: {report.check.summary()}", markup=False)
        error = report.check.parity_error()
        if error is not None:
            raise error  # the variant stays, marked failed in the manifest; main exits 1


def _caption_folder(onnx_dir: Path, images_dir: Path, output: Path, variant: str, options: DecodeOptions, workers: int) -> None:
    """`caption --images`: a progress bar while the folder is captioned, then one summary line."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vlmexport.errors import ImageError
    from vlmexport.runtime.batch import caption_folder

    columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("caption", total=None)
        report = caption_folder(onnx_dir, images_dir, output, variant, options, workers, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    rate = f", {report.captioned / report.seconds:.1f} images/s on {report.workers} worker(s)" if report.captioned and report.seconds else ""
    out.print(f"{report.captioned} captioned, {report.skipped} already in {output}, {len(report.failures)} failed{rate}", markup=False, highlight=False)
    if report.failures:
        image, problem = report.failures[0]
        raise ImageError(f"{len(report.failures)} image(s) could not be captioned (first: {problem})", f"their lines in {output} carry the error; fix or remove them and run again")


def _print_captions(images: list[Path], captions: list[str], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps([{"image": str(i), "caption": c} for i, c in zip(images, captions)]))
    else:
        for image, text in zip(images, captions):
            typer.echo(f"{image}\t{text}")  # plain: rich would wrap long lines and expand the tab


@app.command()
def synth(
    preset: Annotated[str, typer.Option("--preset", help="name of a file in configs/presets/")],
    output_dir: OutputDir,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Force = False,
) -> None:
    """Write a distilvit-format checkpoint (with real LoRA adapters) from a preset: random weights, or
    smollm2-135m-real's pretrained SmolLM2-135M decoder (needs `make real-weights`).

    Example: vlmexport synth --preset smollm-135m-siglip-base --output-dir synth
    """
    from vlmexport.checkpoint.synth import synth_checkpoint

    result = synth_checkpoint(preset, output_dir, seed=seed, force=force)
    table = Table("checkpoint", "parameters", "bytes")
    table.add_row(str(result.path), f"{result.parameters:,}", f"{result.bytes:,}")
    out.print(table)


def _quiet_libraries() -> None:
    # transformers/peft warn about deprecations and optional torchvision on import; users
    # of this CLI cannot act on them, so they are hidden unless --debug. Through the
    # environment, not `transformers.logging`: importing transformers here would load torch
    # into commands that never use it (caption --onnx-dir, serve, inspect).
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _examples() -> str:
    """Top-level help epilog: the Example line of every command's docstring."""
    lines = []
    for command in app.registered_commands:
        doc = command.callback.__doc__ or ""
        lines += [line.strip().removeprefix("Example: ") for line in doc.splitlines() if "Example:" in line]
    return "Examples:\n\n" + "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run a command, map library errors to one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is honoured wherever it appears, not only before the command name.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    STATE["debug"] = debug
    if not debug:
        _quiet_libraries()
    app.info.epilog = _examples()
    try:
        # Standalone mode: Typer reports its own usage errors (exit 2) and help (exit 0) through
        # SystemExit, using only its public API (its bundled Click is private).
        app(args=argv, prog_name="vlmexport")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except VlmExportError as exc:
        if debug:
            err.print_exception()
        err.print(f"error: {exc}", markup=False, highlight=False)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXPORT_EXTRA:
            raise
        if debug:
            err.print_exception()
        err.print(f"error: this command needs {exc.name}, which `pip install vlmexport` leaves out — pip install 'vlmexport[export]'", markup=False, highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("aborted")
        return 130
    return 0
