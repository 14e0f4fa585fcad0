"""Where the shipped configs live, in a checkout and in an installed wheel alike."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The repository's `configs/`, reached through the `vlmexport/configs` symlink, which
    wheels resolve into package data."""
    return Path(str(files("vlmexport") / "configs"))
