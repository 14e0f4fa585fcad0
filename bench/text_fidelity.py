"""The variants on plain English text only, at scale: is int8's KL the decoder's, or the image prefixes'?

    .venv/bin/python bench/text_fidelity.py --onnx-dir DIR [--modes int8,uint8,fp16,q4] [--chunks 16]

`bench/fidelity_bench.py` teacher-forces 95 tokens of text beside its image prefixes; this
teacher-forces `--chunks` × 128 tokens of the Python documentation's prose (the standard
library's pydoc_data: present offline on every Python, English paragraphs only, grammar and code
dropped) with no image prefix, each variant of an exported bundle against its fp32 — the
real-weights decoder on the text it was trained for. Prints mean KL, the median position, the
positions over 1 nat (KNIFE_EDGE) and the others' mean, and clear-margin top-1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 128


def prose() -> list[str]:
    """Paragraphs of the Python documentation that are sentences: unindented, no grammar rules."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            lines = paragraph.splitlines()
            if lines and all(line[:1].isalpha() for line in lines) and "::=" not in paragraph and len(paragraph) > 200:
                paragraphs.append(" ".join(paragraph.split()))
    return paragraphs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="an exported bundle with its variants (e.g. bench/fidelity_bench.py's workdir/real-onnx)")
    parser.add_argument("--modes", default="int8,uint8,fp16,q4")
    parser.add_argument("--chunks", type=int, default=16, help=f"sequences of {CHUNK} tokens")
    args = parser.parse_args()

    from vlmexport.bundle.manifest import read_manifest
    from vlmexport.bundle.tokenizer import load_tokenizer
    from vlmexport.quantize.fidelity import FidelitySet, compare, decoder_logits
    from vlmexport.runtime.bundle import open_bundle
    from vlmexport.validate.portable import host_line
    from vlmexport.validate.profiles import profile_named

    print(host_line())
    ids = load_tokenizer(args.onnx_dir).encode(" ".join(prose()))
    step = max(CHUNK, len(ids) // args.chunks)  # spread over the whole documentation
    rows = [np.array([ids[i : i + CHUNK]], np.int64) for i in range(0, len(ids) - CHUNK, step)][: args.chunks]
    fp32 = open_bundle(args.onnx_dir, "fp32")
    prefixes = [np.zeros((1, 0, int(fp32.manifest.model["embed_dim"])), np.float32)] * len(rows)
    reference = decoder_logits(fp32, prefixes, rows)
    fset = FidelitySet(prefixes, rows, reference, images=0, pixels=np.zeros((0, 3, 1, 1), np.float32))
    print(f"{len(rows)} × {CHUNK} tokens of the Python documentation's prose, no image prefix")
    print("| variant | mean KL | median KL · positions > 1 nat · mean without them | top-1, clear margin |")
    print("|---|---|---|---|")
    for mode in [m for m in args.modes.split(",") if m in read_manifest(args.onnx_dir).variants]:
        margin = profile_named(mode).logits.top1_margin
        result = compare(fset, decoder_logits(open_bundle(args.onnx_dir, mode), prefixes, rows), margin)
        print(
            f"| {mode} | {result.kl:.4g} | {result.kl_median:.2g} · {result.knife_edges} of {result.positions} · {result.kl_off_edges:.3g} "
            f"| {result.top1:.3f} ({result.clear_positions} counted, margin {margin:g}) |"
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
