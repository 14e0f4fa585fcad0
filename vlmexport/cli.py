"""The command line: parse arguments, call one stage function, render its result.

Errors are turned into one line and an exit code in exactly one place, `main`.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vlmexport.errors import EXIT_USAGE, VlmExportError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Export distilvit-style captioning models to small, verified ONNX bundles.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}

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
    out.print(
        f"merged → {output_dir}  (logits max abs {report.logits_max_abs:.2e} on {report.images} images, "
        f"greedy tokens identical: {report.tokens_identical})"
    )


@app.command()
def export(
    model_dir: ModelDir,
    output_dir: OutputDir = Path("onnx"),
    layout: Annotated[str, typer.Option("--layout", help="distilvit (what prefix_vlm.js loads) or compact (no weight twice)")] = "distilvit",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 18-20")] = 18,
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
        component = "decoder" if name.startswith(("prefix_init", "language_model", "decoder")) else name.split("/")[0].removesuffix(".onnx")
        table.add_row(name, f"{size / 1e6:.2f}", f"{result.parameters.get(component, 0):,}")
    table.add_row("bundle total (with tokenizer, configs)", f"{result.bundle_bytes / 1e6:.2f}", "")
    table.add_row("all parameters at fp32", f"{result.parameter_bytes / 1e6:.2f}", f"{sum(result.parameters.values()):,}")
    out.print(table)
    if result.smoke:
        worst = max(result.smoke, key=lambda m: m.value / m.tolerance)
        out.print(f"verified: {len(result.smoke)} smoke measurements pass (worst {worst.component} {worst.output} {worst.value:.1e} ≤ {worst.tolerance:.0e})")
    out.print(f"done in {result.seconds:.1f} s")


@app.command()
def inspect(onnx_dir: Annotated[Path, typer.Argument(help="bundle folder")]) -> None:
    """Show a bundle's components, signatures, sizes and variants (hashes verified).

    Example: vlmexport inspect onnx
    """
    from vlmexport.exporter.inspect import inspect_bundle

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


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="checkpoint folder (torch backend)")] = None,
    backend: Annotated[str, typer.Option("--backend", help="torch")] = "torch",
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="default: config max_length")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Caption images with the PyTorch reference model (greedy).

    Example: vlmexport caption --backend torch --model-dir ckpt photo.jpg
    """
    from vlmexport.checkpoint.caption import caption_images_torch
    from vlmexport.errors import UsageError

    if backend != "torch":
        raise UsageError(f"unknown backend {backend!r}", "use --backend torch")
    if model_dir is None:
        raise UsageError("--backend torch needs --model-dir", "pass --model-dir pointing at the checkpoint")
    captions = caption_images_torch(model_dir, images, max_new_tokens, allow_pickle)
    _print_captions(images, captions, as_json)


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
    """Write a random-weight distilvit-format checkpoint (with real LoRA adapters) from a preset.

    Example: vlmexport synth --preset smollm-135m-siglip-base --output-dir synth
    """
    from vlmexport.checkpoint.synth import synth_checkpoint

    result = synth_checkpoint(preset, output_dir, seed=seed, force=force)
    table = Table("checkpoint", "parameters", "bytes")
    table.add_row(str(result.path), f"{result.parameters:,}", f"{result.bytes:,}")
    out.print(table)


def _quiet_libraries() -> None:
    # transformers/peft warn about deprecations and optional torchvision on import; users
    # of this CLI cannot act on them, so they are hidden unless --debug.
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


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
    except KeyboardInterrupt:
        err.print("aborted")
        return 130
    return 0
