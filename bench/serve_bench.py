"""Serving benchmark: `vlmexport serve` in its own process, POST /caption from many clients at once.

    .venv/bin/python bench/serve_bench.py [--onnx-dir DIR] [--requests 200] [--concurrency 1,16,64]
        [--workers N] [--queue N] [--variant fp32]

Without --onnx-dir it exports the shapes example (examples/shapes/model) into a temporary
folder. For each concurrency it sends the requests (the example's held-out images, round
robin) on fresh connections and prints, per level: answers by status, client-side p50 and p95
latency of the 200s, the server's median time per answer (its Server-Timing header: queueing
in the pool included, the network not), throughput in captions per second, and the server's
RSS idle and at its peak. On a shared machine, compare ratios of one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vlmexport.serve.load import ServerProcess, caption_load

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, help="bundle to serve (default: the shapes example, exported now)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--workers", type=int, default=0, help="server --workers (0: one per core)")
    parser.add_argument("--queue", type=int, help="server --queue (default: 8 per worker)")
    parser.add_argument("--variant", default="fp32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        bundle = args.onnx_dir or export_shapes(Path(tmp) / "onnx")
        images = [p.read_bytes() for p in sorted((SHAPES / "images").glob("*.png"))[:8]]
        options = ["--workers", str(args.workers), *(["--queue", str(args.queue)] if args.queue is not None else [])]
        server = ServerProcess(bundle, *options)
        try:
            caption_load(server.url, images, len(images), 1, {"variant": args.variant})  # warm-up
            idle = server.rss()
            print(f"bundle {bundle}, variant {args.variant}, {args.requests} requests per level; server RSS idle {idle / 1e6:.0f} MB")
            print(f"{'clients':>7} {'200':>5} {'503':>5} {'other':>5} {'p50 ms':>8} {'p95 ms':>8} {'server ms':>9} {'captions/s':>10} {'peak RSS MB':>11}")
            for concurrency in levels:
                server.reset_peak()
                result = caption_load(server.url, images, args.requests, concurrency, {"variant": args.variant})
                counts = result.statuses()
                other = sum(n for status, n in counts.items() if status not in (200, 503))
                print(
                    f"{concurrency:>7} {counts.get(200, 0):>5} {counts.get(503, 0):>5} {other:>5} {result.percentile(0.5) * 1e3:>8.0f} "
                    f"{result.percentile(0.95) * 1e3:>8.0f} {result.server_median_ms():>9.0f} {result.throughput:>10.1f} {server.peak() / 1e6:>11.0f}"
                )
                if result.errors:
                    print(f"        connection errors: {len(result.errors)} (first: {result.errors[0]})")
        finally:
            server.stop()


def export_shapes(out: Path) -> Path:
    from vlmexport.exporter.export import export_bundle

    export_bundle(SHAPES / "model", out, layout="distilvit", verify=False)
    return out


if __name__ == "__main__":
    main()
