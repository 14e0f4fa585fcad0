"""The bundle manifest `vlmexport.json`: what is in the bundle and how to trust it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmexport.errors import BundleError
from vlmexport.fsutil import atomic_file

MANIFEST_NAME = "vlmexport.json"
SCHEMA_VERSION = 1
LAYOUTS: dict[str, dict[str, str]] = {
    "distilvit": {
        "vision_encoder": "vision_encoder/model.onnx",
        "projection": "projection.onnx",
        "prefix_init": "prefix_init.onnx",
        "language_model": "language_model/model.onnx",
    },
    "compact": {
        "vision_encoder": "vision_encoder/model.onnx",
        "projection": "projection.onnx",
        "decoder": "decoder/model.onnx",
    },
    # What transformers.js (@huggingface/transformers, pinned in web/package.json) loads for its
    # image-text-to-text models: session names and the files under onnx/ are its own
    # (models/session_config.js). The vision encoder includes the projection; the embedding
    # table is read twice, by embed_tokens and by the decoder's tied head (two sessions, two files).
    "transformers.js": {
        "vision_encoder": "onnx/vision_encoder.onnx",
        "embed_tokens": "onnx/embed_tokens.onnx",
        "decoder_model_merged": "onnx/decoder_model_merged.onnx",
    },
}
VARIANTS = ("fp32", "int8", "uint8", "fp16", "q4")
# Second names a library looks for, per layout: variant → suffix. transformers.js' dtype "q8" (its
# default on WebAssembly) reads `*_quantized.onnx` (src/utils/dtypes.js); vlmexport's 8-bit variant
# of record is int8, so `quantize --mode int8` writes its graphs under both names (hard links,
# recorded in the manifest with `alias_of`; the int8 check covers both).
ALIASES: dict[str, dict[str, str]] = {"transformers.js": {"int8": "quantized"}}


def decoder_graphs(layout: str) -> tuple[str, str]:
    """(the graph of the first pass, the graph of the cached steps) of a layout."""
    if layout == "distilvit":
        return ("prefix_init", "language_model")
    return ("decoder_model_merged",) * 2 if layout == "transformers.js" else ("decoder", "decoder")


def projection_in_vision(layout: str) -> bool:
    """Whether the layout's vision encoder already returns the projected prefix (no projection graph)."""
    return "projection" not in LAYOUTS[layout]


def variant_path(fp32_path: str, variant: str) -> str:
    """`vision_encoder/model.onnx` → `vision_encoder/model_int8.onnx`; fp32 keeps the plain name."""
    if variant == "fp32":
        return fp32_path
    stem, _, ext = fp32_path.rpartition(".")
    return f"{stem}_{variant}.{ext}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    """In-memory form of vlmexport.json."""

    layout: str
    opset: int
    model: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, str]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    def component_file(self, component: str, variant: str = "fp32") -> str:
        """Relative path of a component's graph in a variant.

        Raises:
            BundleError: the variant is not in the bundle.
        """
        if variant not in self.variants:
            if variant not in VARIANTS:
                fix = f"use one of {', '.join(VARIANTS)}"
            elif variant == "fp32":
                fix = "re-run `vlmexport export`: every bundle has fp32"
            else:
                fix = f"run `vlmexport quantize --mode {variant}` first, or pick a variant it has"
            raise BundleError(f"variant {variant!r} is not in this bundle (it has {', '.join(self.variants) or 'none'})", fix)
        return self.variants[variant][component]

    def variant_bytes(self, variant: str) -> int:
        """Bytes of the files written for `variant` (its graphs and their external data), each
        counted once: a second name of the same graph (`alias_of`, see ALIASES) adds nothing."""
        return sum(info["size"] for info in self.files.values() if info.get("variant") == variant and "alias_of" not in info)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "layout": self.layout,
            "opset": self.opset,
            "versions": self.versions,
            "model": self.model,
            "variants": self.variants,
            "files": dict(sorted(self.files.items())),
            "checks": self.checks,
        }

    def write(self, bundle_dir: Path) -> None:
        """Write vlmexport.json whole or not at all: `check` rewrites it inside a finished bundle."""
        with atomic_file(bundle_dir / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def describe_file(self, bundle_dir: Path, relative: str, **extra: Any) -> None:
        """Record a file's size and sha256 (and anything else given). The manifest never lists
        itself: it changes after export (each check records its verdict in `checks`), so its own
        hash would go stale and `verify_files` would reject a sound bundle."""
        if relative == MANIFEST_NAME:
            return
        path = bundle_dir / relative
        self.files[relative] = {"size": path.stat().st_size, "sha256": sha256_file(path), **extra}


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read `bundle_dir/vlmexport.json`.

    Raises:
        BundleError: no folder, no manifest, unreadable or of an unknown schema.
    """
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist", "pass --onnx-dir pointing at a `vlmexport export` output")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing", "re-run `vlmexport export`; vlmexport only reads bundles it wrote")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or data.get("layout") not in LAYOUTS:
            found = (data.get("schema_version"), data.get("layout")) if isinstance(data, dict) else ("none", "none")
            raise ValueError(f"schema {found[0]}, layout {found[1]}")
        manifest = Manifest(
            layout=data["layout"],
            opset=int(data["opset"]),
            model=data["model"],
            versions=data["versions"],
            files=data["files"],
            variants=data["variants"],
            checks=data.get("checks", {}),
        )
        _check_structure(manifest)
        return manifest
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is not a vlmexport manifest ({exc})", "re-run `vlmexport export`, or restore the bundle's vlmexport.json") from exc


# The model fields every runtime reads as counts (bundle.Bundle, captioner, bench).
MODEL_COUNTS = ("num_layers", "kv_heads", "head_dim", "embed_dim", "prefix_length", "max_length")


def _check_structure(manifest: Manifest) -> None:
    """What the commands index into is there and of its kind, so a hand-edited or damaged
    manifest is one line naming what is wrong, not a traceback further on. Every graph a variant
    names must be a listed file: an unlisted one would never be hashed.

    Raises:
        ValueError, TypeError: naming the first field that is not what vlmexport writes.
    """
    for name, value in (("model", manifest.model), ("versions", manifest.versions), ("files", manifest.files), ("variants", manifest.variants), ("checks", manifest.checks)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} is {type(value).__name__}, not an object")
    for key in MODEL_COUNTS:
        if type(manifest.model.get(key)) is not int or manifest.model[key] < 0:
            raise ValueError(f"model.{key} is {manifest.model.get(key)!r}, not a count")
    for relative, info in manifest.files.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ValueError(f"file {relative!r} is outside the bundle")
        if not isinstance(info, dict) or type(info.get("size")) is not int or not isinstance(info.get("sha256"), str):
            raise ValueError(f"file {relative!r} has no size and sha256")
    for variant, components in manifest.variants.items():
        if not isinstance(components, dict) or not components:
            raise ValueError(f"variant {variant!r} names no graphs")
        for component, relative in components.items():
            if relative not in manifest.files:
                raise ValueError(f"variant {variant!r} names {component} {relative!r}, which files does not list")


def verify_files(bundle_dir: Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Every listed file exists with its size and sha256.

    Raises:
        BundleError: naming the first file that is missing or differs.
    """
    for relative, info in manifest.files.items():
        if only is not None and relative not in only:
            continue
        path = bundle_dir / relative
        if not path.is_file():
            raise BundleError(f"{relative} is listed in the manifest but missing", "re-run `vlmexport export` (or copy the whole bundle)")
        if path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            raise BundleError(f"{relative} does not match its manifest sha256 (changed or truncated)", "re-export, or restore the file")
