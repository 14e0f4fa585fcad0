"""optimum loads the distilvit layout's `language_model/` as it is, and its greedy tokens are the
Python runtime's and PyTorch's.

optimum-onnx pins transformers < 4.58 and this project runs transformers 5, so optimum gets a
virtual environment of its own (default ~/.cache/vlmexport/optimum-venv, made on first use:
torch 2.13.0 — the CPU wheel this machine carries — and optimum-onnx[onnxruntime]). This script
runs in the project's environment: it exports the shapes example (distilvit layout, opsets 18
and 23), computes greedy continuations of a few text prompts with the bundle's
`language_model/model.onnx` through vlmexport's runtime and with the merged PyTorch decoder,
then asks the optimum environment to load the same folder with
`ORTModelForCausalLM.from_pretrained(bundle, subfolder="language_model")` and generate.

    python bench/optimum_check.py [--model-dir examples/shapes/model] [--venv DIR] [--tokens 8]

Prints one line per opset and prompt, and exits 1 if any token sequence differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.exporter.export import export_bundle
from vlmexport.runtime.bundle import open_bundle

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0"]
PROMPTS = ["a", "a red", "a blue square on", "a green triangle on a"]

# Runs inside the optimum environment: load the folder, generate greedily, print JSON.
OPTIMUM_SIDE = """
import json, sys
from importlib.metadata import version
import torch
from optimum.onnxruntime import ORTModelForCausalLM
bundle, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(bundle, subfolder="language_model", use_cache=True, use_io_binding=False)
out = {"versions": {p: version(p) for p in ("optimum-onnx", "optimum", "transformers", "onnxruntime", "torch")}, "class": type(model).__name__, "tokens": [], "logits": []}
for ids in prompts:
    input_ids = torch.tensor([ids])
    generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens, do_sample=False, num_beams=1)
    out["tokens"].append(generated[0, len(ids):].tolist())
    out["logits"].append(model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, -1].tolist())
print(json.dumps(out))
"""


def optimum_python(venv: Path) -> Path:
    """The optimum environment's python, made on first use."""
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
        (venv / ".installed").write_text("\n".join(PACKAGES) + "\n")
    return python


def runtime_tokens(bundle_dir: Path, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy continuations through vlmexport's runtime: language_model/model.onnx from an empty
    past, up to and including EOS (as transformers' generate returns them)."""
    bundle = open_bundle(bundle_dir, components=("language_model",))
    eos = bundle.manifest.model["eos_token_id"]
    out, last = [], []
    for ids in prompts:
        logits, past = bundle.step(np.array([ids], np.int64), bundle.empty_past(1))
        last.append(logits[0, -1])
        chosen = []
        for _ in range(tokens):
            chosen.append(int(logits[0, -1].argmax()))
            if chosen[-1] == eos:
                break
            logits, past = bundle.step(np.array([[chosen[-1]]], np.int64), past)
        out.append(chosen)
    return out, last


@torch.no_grad()
def torch_tokens(model_dir: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations of the merged PyTorch decoder (transformers' generate)."""
    checkpoint = load_checkpoint(model_dir)
    lm = checkpoint.model.language_model.merge_and_unload() if checkpoint.model.has_lora else checkpoint.model.causal_lm
    out = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        generated = lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens, do_sample=False, num_beams=1)
        out.append(generated[0, len(ids) :].tolist())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "examples" / "shapes" / "model")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "vlmexport" / "optimum-venv")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--opsets", default="18,23")
    args = parser.parse_args()
    python = optimum_python(args.venv)
    tokenizer = load_checkpoint(args.model_dir).tokenizer
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    reference = torch_tokens(args.model_dir, prompts, args.tokens)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for opset in (int(o) for o in args.opsets.split(",")):
            bundle = Path(tmp) / f"opset{opset}"
            export_bundle(args.model_dir, bundle, opset=opset)
            runtime, runtime_logits = runtime_tokens(bundle, prompts, args.tokens)
            done = subprocess.run([str(python), "-c", OPTIMUM_SIDE, str(bundle), json.dumps(prompts), str(args.tokens)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"opset {opset}: optimum could not load or run the folder:\n{done.stderr[-3000:]}")
                failures += 1
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"opset {opset}: {result['class']} loaded language_model/ ({', '.join(f'{k} {v}' for k, v in result['versions'].items())})")
            for text, ref, ours, theirs, ours_logits, theirs_logits in zip(PROMPTS, reference, runtime, result["tokens"], runtime_logits, result["logits"]):
                same = ref == ours == theirs
                failures += not same
                diff = float(np.abs(np.asarray(theirs_logits, np.float32) - ours_logits).max())
                print(f"  {text!r:26} pytorch {ref} runtime {ours} optimum {theirs} {'identical' if same else 'DIFFER'}; last-position logits max |diff| {diff:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
