"""Where the shipped configs live, in a checkout and in an installed wheel alike."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The repository's `configs/`, reached through the `vlmexport/configs` symlink, which
    wheels resolve into package data."""
    return Path(str(files("vlmexport") / "configs"))


def web_dir() -> Path:
    """The repository's `web/` (prefix_vlm.js, demo.html, node_modules after web/install-deps.sh):
    a source checkout's, as the browser files are not packaged into the wheel."""
    return Path(__file__).resolve().parents[1] / "web"


def vendor_dirs() -> dict[str, Path]:
    """URL folder → the pinned npm package's dist folder the demo page imports from (see its import map)."""
    modules = web_dir() / "node_modules"
    return {"vendor/onnxruntime-web": modules / "onnxruntime-web" / "dist", "vendor/tokenizers": modules / "@huggingface" / "tokenizers" / "dist"}
