"""`inspect`: what a bundle holds, read from its manifest with every hash verified."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmexport.bundle.manifest import Manifest, read_manifest, verify_files


@dataclass(frozen=True)
class GraphInfo:
    component: str
    variant: str
    path: str
    size: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def inspect_bundle(bundle_dir: Path) -> tuple[Manifest, list[GraphInfo]]:
    """The manifest and one row per graph and variant, after verifying every file's sha256.

    Raises:
        BundleError: no manifest, or a file missing or changed.
    """
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    rows = []
    for variant, components in manifest.variants.items():
        for component, relative in components.items():
            info = manifest.files[relative]
            rows.append(GraphInfo(component, variant, relative, info["size"], info.get("inputs", []), info.get("outputs", [])))
    return manifest, rows
