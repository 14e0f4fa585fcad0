"""Browser benchmark: caption time per stage in headless Chromium (ONNX Runtime Web, WebAssembly,
one thread unless --threads), per variant, through the real demo page served by `vlmexport serve`.

    .venv/bin/python bench/web_bench.py [--model-dir examples/shapes/model | --onnx-dir BUNDLE]
        [--variants fp32,int8] [--images 4] [--repeat 3] [--threads 1] [--screenshot docs/demo.png]

Without --onnx-dir the checkpoint is exported (distilvit layout) and quantized to int8 into a
temporary folder. Each image is captioned `repeat` times; the first caption of a page load is a
warm-up and is left out of the medians. Every caption is compared with the Python runtime's.
Needs web/install-deps.sh (Node, Chromium, npm packages).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "vision", "projection", "firstPass", "steps", "tokenizer", "total")


def bundle_for(args: argparse.Namespace, workdir: Path) -> Path:
    if args.onnx_dir:
        return args.onnx_dir
    from vlmexport.exporter.export import export_bundle
    from vlmexport.quantize.quantize import quantize_bundle

    out = workdir / "onnx"
    export_bundle(args.model_dir, out, layout="distilvit", verify=False)
    for variant in args.variants:
        if variant != "fp32":
            quantize_bundle(out, variant, verify=False)
    return out


def drawn_images(folder: Path, count: int) -> list[Path]:
    """Shapes drawn like the example's held-out images, when the example is not built."""
    from vlmexport.samples import random_shape

    rng = random.Random(7)
    paths = [folder / f"{i:03d}.png" for i in range(count)]
    for path in paths:
        random_shape(rng, 64)[0].save(path)
    return paths


def browser(url: str, variant: str, images: list[Path], repeat: int, threads: int, screenshot: Path | None) -> dict:
    command = ["node", "test/browser.mjs", "--url", url, "--variant", variant, "--repeat", str(repeat), "--threads", str(threads)]
    command += [arg for image in images for arg in ("--image", str(image))]
    if screenshot:
        command += ["--compare", "--screenshot", str(screenshot.resolve())]
    done = subprocess.run(command, cwd=REPO / "web", capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"browser run failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "examples" / "shapes" / "model")
    parser.add_argument("--onnx-dir", type=Path, default=None)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["fp32", "int8"])
    parser.add_argument("--images", type=int, default=4, help="how many held-out shapes images")
    parser.add_argument("--images-dir", type=Path, default=REPO / "examples" / "shapes" / "images", help="PNG images to caption")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="WebAssembly threads (the page is cross-origin isolated)")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of the demo page (first variant, after its last caption)")
    args = parser.parse_args()

    from vlmexport.runtime.caption import caption_images
    from vlmexport.serve.server import make_server

    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp:
        images = sorted(args.images_dir.glob("*.png"))[: args.images] or drawn_images(Path(tmp), args.images)
        bundle = bundle_for(args, Path(tmp))
        server = make_server(bundle, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        rows = []
        for i, variant in enumerate(args.variants):
            page = browser(f"{server.url}/", variant, images, args.repeat, args.threads, args.screenshot if i == 0 else None)
            python = caption_images(bundle, images, variant, batch_size=1)
            warm = [r for j, r in enumerate(page["results"]) if j % args.repeat or args.repeat == 1]
            medians = {stage: statistics.median(r["timings"][stage] for r in warm) for stage in STAGES}
            tokens = statistics.median(len(r["tokens"]) for r in warm)
            same = sum(r["caption"] == python[j // args.repeat] for j, r in enumerate(page["results"]))
            manifest = json.loads((bundle / "vlmexport.json").read_text())
            graphs = sum(manifest["files"][rel]["size"] for rel in manifest["variants"][variant].values())
            rows.append((variant, graphs / 1e6, page["loadTimings"]["total"], medians, tokens, same, len(page["results"])))
        server.shutdown()
        server.server_close()

    header = f"{'variant':8} {'MB':>7} {'load ms':>8} " + " ".join(f"{s:>10}" for s in STAGES) + f" {'tokens':>6}  same as Python"
    print(f"Chromium (ONNX Runtime Web, WebAssembly, {args.threads} thread(s)), median ms over {args.images} images x {args.repeat} (warm)")
    print(header)
    for variant, mb, load, medians, tokens, same, total in rows:
        print(f"{variant:8} {mb:7.2f} {load:8.0f} " + " ".join(f"{medians[s]:10.1f}" for s in STAGES) + f" {tokens:6.0f}  {same}/{total}")


if __name__ == "__main__":
    main()
