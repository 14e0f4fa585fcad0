"""Tolerance profiles: the bounds `check` holds a bundle to, one TOML file per profile.

The shipped profiles live in configs/tolerances/ (fp32, int8, uint8, fp16, q4), each number
with a comment giving the measurement behind it. Every bound scales with the model (see
validate.metrics): errors relative to the tensor's RMS, cosine, KL, and top-1 agreement counted
where the reference's top-2 margin exceeds the variant's measured noise (`top1_margin`). A file
is validated whole: every problem (unknown or missing key, wrong type, value out of range) is
collected and reported in one error, so a user fixing a profile sees everything at once.

Sections: [vision_encoder], [projection], [present] (rel_max, rel_mean, cosine); [logits] (the
same, top1, top1_margin); [end_to_end] (caption_match, teacher_forced_top1 — clear-margin with
[logits] top1_margin — teacher_forced_kl, and optional target_kl: a fidelity goal reported beside
the verdict, never failed on); and, optional, [merge] (rel_max, rel_mean,
teacher_forced_kl, top1, top1_margin): the merged decoder against the LoRA model, which
`merge`, `export` and `check` verify with fp32.toml's unless a profile has its own.
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
# The values a bound may take: errors, divergences and margins are non-negative, rates are fractions.
RANGES: dict[str, tuple[float, float]] = {
    "rel_max": (0.0, math.inf),
    "rel_mean": (0.0, math.inf),
    "cosine": (-1.0, 1.0),
    "top1": (0.0, 1.0),
    "top1_margin": (0.0, math.inf),
    "caption_match": (0.0, 1.0),
    "teacher_forced_top1": (0.0, 1.0),
    "teacher_forced_kl": (0.0, math.inf),
    "target_kl": (0.0, math.inf),
}
# Keys a section may leave out (the dataclass gives their default).
OPTIONAL_KEYS = frozenset({"target_kl"})


@dataclass(frozen=True)
class TensorBounds:
    """Bounds on one kind of tensor, ONNX against the reference (see validate.metrics):
    relative errors at most, cosine (and clear-margin top-1) at least."""

    rel_max: float  # max |Δ| / rms(reference)
    rel_mean: float  # mean |Δ| / rms(reference)
    cosine: float
    top1: float | None = None  # logits only: arg-max agreement where the reference's margin is clear
    top1_margin: float | None = None  # logits only: the variant's measured noise, in nats (see metrics)


@dataclass(frozen=True)
class EndToEndBounds:
    """Bounds on whole captions: free-running greedy tokens and teacher-forced decoding."""

    caption_match: float  # fraction of images whose greedy tokens equal the reference's, at least
    # Arg-max agreement along the reference tokens where the reference's top-2 margin exceeds
    # the profile's logits.top1_margin, at least.
    teacher_forced_top1: float
    teacher_forced_kl: float  # mean KL(reference ‖ candidate) per position, in nats, at most
    # The variant's fidelity goal for that mean (issue #12's target), where it differs from the
    # parity bound above: `check` reports whether it is met but does not fail on it, and
    # `--keep-fp32 auto` aims at it. Why not a bound: over check's few images the mean is carried
    # by a few positions near a tie, and which of them tip moves with the CPU's float kernels
    # (int8 on the real-weights model: 0.0084 on AVX512-VNNI, 0.00995 on AVX2), so a bound at the
    # goal would give one bundle different verdicts on different machines; and a few hard images
    # carry it (q4 on the real-weights model: 0.34 over check's 4, one of them uniform noise,
    # 0.09 over the 96 images and text that issue #12's goal is measured on).
    target_kl: float | None = None

    @property
    def goal_kl(self) -> float:
        """The mean KL the variant aims at: its goal, else its bound."""
        return self.teacher_forced_kl if self.target_kl is None else self.target_kl


@dataclass(frozen=True)
class MergeBounds:
    """Bounds on the merged decoder against the LoRA model, both PyTorch float32, teacher-forced
    along the LoRA model's greedy tokens (`vlmexport merge`, `export`, and `check --model-dir`).
    Identical greedy tokens are reported, not required: a near-tie may flip in a correct merge."""

    rel_max: float  # logits max |Δ| / rms(reference logits)
    rel_mean: float
    teacher_forced_kl: float  # mean KL(LoRA ‖ merged) per position, in nats, at most
    top1: float  # arg-max agreement where the LoRA model's top-2 margin exceeds top1_margin, at least
    top1_margin: float  # the merge's measured noise, in nats


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
    # Optional: fp32.toml has it; a profile without it has its merge judged by fp32's (the merge
    # is float32 PyTorch arithmetic whatever variant is checked).
    merge: MergeBounds | None = None


TENSOR_SECTIONS = ("vision_encoder", "projection", "logits", "present")
SECTIONS: dict[str, type] = {**dict.fromkeys(TENSOR_SECTIONS, TensorBounds), "end_to_end": EndToEndBounds, "merge": MergeBounds}
OPTIONAL_SECTIONS = frozenset({"merge"})
LOGITS_ONLY = ("top1", "top1_margin")


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
    sections = {
        name: _section(data.get(name), name, cls, problems)
        for name, cls in SECTIONS.items()
        if name not in OPTIONAL_SECTIONS or name in data
    }
    if problems:
        raise UsageError(
            f"{path}: {len(problems)} problem(s): " + "; ".join(problems),
            "fix them; every bound is a number, configs/tolerances/fp32.toml shows the schema",
        )
    return Profile(name=path.stem, description=str(description), source=str(path), **sections)


def _section(table: Any, name: str, cls: type, problems: list[str]) -> Any:
    """One section as `cls`, appending to `problems` instead of stopping at the first."""
    if not isinstance(table, dict):
        problems.append(f"[{name}] is missing" if table is None else f"[{name}] must be a table")
        return None
    allowed = [f.name for f in fields(cls) if cls is not TensorBounds or name == "logits" or f.name not in LOGITS_ONLY]
    problems += [f"[{name}] {key} is missing" for key in allowed if key not in table and key not in OPTIONAL_KEYS]
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
    if "rel_max" in values and "rel_mean" in values and values["rel_mean"] > values["rel_max"]:
        problems.append(f"[{name}] rel_mean = {values['rel_mean']} exceeds rel_max = {values['rel_max']} (a mean cannot pass where its max fails)")
    if values.get("target_kl", 0.0) > values.get("teacher_forced_kl", math.inf):
        problems.append(f"[{name}] target_kl = {values['target_kl']} exceeds teacher_forced_kl = {values['teacher_forced_kl']} (a goal looser than the bound says nothing)")
    return cls(**values) if all(key in values for key in allowed if key in table or key not in OPTIONAL_KEYS) else None


def merge_bounds(profile: Profile) -> MergeBounds:
    """The profile's [merge] bounds, or the fp32 profile's when it has none.

    Raises:
        UsageError: neither has a [merge] section.
    """
    if profile.merge is not None:
        return profile.merge
    fp32 = profile_named("fp32")
    if fp32.merge is None:
        raise UsageError(f"{fp32.source} has no [merge] section", "restore configs/tolerances/fp32.toml")
    return fp32.merge
