"""The ONNX side needs no export extra: `caption --onnx-dir`, `serve` and `inspect`, each run as a
user runs it in a fresh interpreter, never import torch, transformers, peft (nor onnx or
safetensors); a command that needs the extra and lacks it says which pip command adds it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_export import export_tiny  # noqa: F401

from vlmexport.cli import EXPORT_EXTRA
from vlmexport.samples import sample_images

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI in the main thread (as the console script does); a second thread, once the server
# answers (or at once for a command that returns), reports which modules the process loaded.
PROBE = """
import json, os, sys, threading, time, urllib.error, urllib.request
from vlmexport.cli import main
argv, url = json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None

def report(code):
    print("MODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}), flush=True)
    os._exit(0)

def wait_for_server():
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # any HTTP answer: the server is up
        except OSError:
            time.sleep(0.1)
    if len(sys.argv) > 3:  # caption one image first: what a request imports counts too
        boundary = "probe-boundary"
        image = open(sys.argv[3], "rb").read()
        body = (f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"image\\"; filename=\\"a.png\\"\\r\\n"
                f"Content-Type: image/png\\r\\n\\r\\n").encode() + image + f"\\r\\n--{boundary}--\\r\\n".encode()
        origin = url.split("/", 3)
        request = urllib.request.Request(f"{origin[0]}//{origin[2]}/caption", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        print("CAPTION " + json.dumps(json.loads(urllib.request.urlopen(request, timeout=60).read())), flush=True)
    report(None)

if url:
    threading.Thread(target=wait_for_server, daemon=True).start()
report(main(argv))
"""
BLOCK_TORCH = """
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from vlmexport.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def loaded(argv: list[str], url: str | None = None, image: str | None = None) -> tuple[int | None, set[str]]:
    result = run(PROBE, json.dumps(argv), *([url] if url else []), *([image] if image else []))
    line = next((line for line in result.stdout.splitlines() if line.startswith("MODULES ")), None)
    assert line is not None, result.stdout + result.stderr
    assert image is None or '"caption"' in result.stdout, result.stdout + result.stderr  # the request was captioned
    data = json.loads(line.removeprefix("MODULES "))
    return data["code"], {name.split(".")[0] for name in data["modules"]}


@pytest.fixture(scope="module")
def bundle(export_tiny: Callable[..., Path]) -> Path:  # noqa: F811
    return export_tiny()


def test_caption_with_a_bundle_imports_no_export_dependency(bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    sample_images(1, 40)[0].save(image)
    code, modules = loaded(["caption", "--onnx-dir", str(bundle), "--num-beams", "2", str(image)])
    assert code == 0
    assert "onnxruntime" in modules and "tokenizers" in modules  # the probe sees what the command loaded
    assert not modules & EXPORT_EXTRA, sorted(modules & EXPORT_EXTRA)


def test_inspect_imports_no_export_dependency(bundle: Path) -> None:
    code, modules = loaded(["inspect", str(bundle)])
    assert code == 0
    assert not modules & EXPORT_EXTRA, sorted(modules & EXPORT_EXTRA)


def test_serve_imports_no_export_dependency(bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port; the server binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    image = tmp_path / "a.png"
    sample_images(1, 40)[0].save(image)
    code, modules = loaded(["serve", "--onnx-dir", str(bundle), "--port", str(port), "--quiet"], f"http://127.0.0.1:{port}/bundle/vlmexport.json", str(image))
    assert code is None  # still serving when the modules were listed
    assert not modules & EXPORT_EXTRA, sorted(modules & EXPORT_EXTRA)


def test_a_command_needing_the_export_extra_names_the_pip_command(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run(BLOCK_TORCH, json.dumps(["export", "--model-dir", str(tiny_checkpoint), "--output-dir", str(tmp_path / "out")]))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'vlmexport[export]'" in lines[0] and "torch" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
