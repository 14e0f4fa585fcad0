"""Tolerance profiles: the bounds `check` holds a bundle to, one TOML file per profile.

The shipped profiles live in configs/tolerances/ (fp32, int8, uint8, fp16, q4), each number
with a comment giving the measurement behind it. A file is validated whole: every problem
(unknown or missing key, wrong type, value out of range) is collected and reported in one
error, so a user fixing a profile sees everything at once.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vlmexport.errors import UsageError
from vlmexport.resources import configs_dir

PROFILE_DIR = configs_dir() / "tolerances"

# Metrics where a larger value is better: their bound is a minimum, every other bound a maximum.
HIGHER_IS_BETTER = frozenset({"cosine", "top1", "caption_match", "teacher_forced_top1"})
# The values a bound may take: errors and divergences are non-negative, rates are fractions.
RANGES: dict[str, tuple[float, float]] = {
    "max_abs": (0.0, math.inf),
    "mean_abs": (0.0, math.inf),
    "cosine": (-1.0, 1.0),
    "top1": (0.0, 1.0),
    "caption_match": (0.0, 1.0),
    "teacher_forced_top1": (0.0, 1.0),
    "teacher_forced_kl": (0.0, math.inf),
}


@dataclass(frozen=True)
class TensorBounds:
    """Bounds on one kind of tensor, ONNX against the reference: errors at most, cosine (and top-1) at least."""

    max_abs: float
    mean_abs: float
    cosine: float
    top1: float | None = None  # logits only: fraction of positions with the same arg-max


@dataclass(frozen=True)
class EndToEndBounds:
    """Bounds on whole captions: free-running greedy tokens and teacher-forced decoding."""

    caption_match: float  # fraction of images whose greedy tokens equal the reference's, at least
    teacher_forced_top1: float  # arg-max agreement along the reference tokens, at least
    teacher_forced_kl: float  # mean KL(reference ‖ candidate) per position, in nats, at most


@dataclass(frozen=True)
class Profile:
    """A named set of bounds; `source` is the file it was read from."""

    name: str
    description: str
    vision_encoder: TensorBounds  # last_hidden_state
    projection: TensorBounds  # projected_prefix
    logits: TensorBounds  # first pass and every cached step
    present: TensorBounds  # every present.{i}.key/value, first pass and every step
    end_to_end: EndToEndBounds
    source: str


TENSOR_SECTIONS = ("vision_encoder", "projection", "logits", "present")
SECTIONS: dict[str, type] = {**dict.fromkeys(TENSOR_SECTIONS, TensorBounds), "end_to_end": EndToEndBounds}


def profile_names() -> list[str]:
    """Names of the shipped profiles (files in configs/tolerances/)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_named(name: str) -> Profile:
    """The shipped profile `name`.

    Raises:
        UsageError: no such profile, or its file is invalid.
    """
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown tolerance profile {name!r}", f"choose one of: {', '.join(profile_names())}, or pass --config FILE")
    return load_profile(path)


def load_profile(path: Path) -> Profile:
    """Read and validate a profile file; its name is the file's stem.

    Raises:
        UsageError: the file is missing, not TOML, or breaks the schema (every problem listed).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tolerance profile {path} does not exist", "pass a TOML file like configs/tolerances/fp32.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML ({exc})", "fix the syntax; configs/tolerances/fp32.toml is an example") from exc
    problems: list[str] = []
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append("description must be a non-empty string")
    unknown = sorted(set(data) - {"description", *SECTIONS})
    problems += [f"unknown key {key!r} (known: description, {', '.join(SECTIONS)})" for key in unknown]
    sections = {name: _section(data.get(name), name, cls, problems) for name, cls in SECTIONS.items()}
    if problems:
        raise UsageError(
            f"{path}: {len(problems)} problem(s): " + "; ".join(problems),
            "fix them; every bound is a number, configs/tolerances/fp32.toml shows the schema",
        )
    return Profile(name=path.stem, description=description, source=str(path), **sections)


def _section(table: Any, name: str, cls: type, problems: list[str]) -> Any:
    """One section as `cls`, appending to `problems` instead of stopping at the first."""
    if not isinstance(table, dict):
        problems.append(f"[{name}] is missing" if table is None else f"[{name}] must be a table")
        return None
    allowed = [f.name for f in fields(cls) if name == "logits" or f.name != "top1"]
    required = [key for key in allowed if key != "top1" or name == "logits"]
    problems += [f"[{name}] {key} is missing" for key in required if key not in table]
    problems += [f"[{name}] unknown key {key!r} (known: {', '.join(allowed)})" for key in table if key not in allowed]
    values: dict[str, float] = {}
    for key in allowed:
        if key not in table:
            continue
        value = table[key]
        low, high = RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"[{name}] {key} = {value!r} must be a number")
        elif not low <= value <= high:
            problems.append(f"[{name}] {key} = {value} must be between {low} and {high}")
        else:
            values[key] = float(value)
    if "max_abs" in values and "mean_abs" in values and values["mean_abs"] > values["max_abs"]:
        problems.append(f"[{name}] mean_abs = {values['mean_abs']} exceeds max_abs = {values['max_abs']} (a mean cannot pass where its max fails)")
    return cls(**values) if len(values) == len(required) else None
