"""What a check found, and how it is written down: table rows for people, JSON for CI.

The JSON form is documented in docs/report-schema.md; bump `REPORT_SCHEMA_VERSION` on any
change a consumer could notice (a renamed or removed field, a changed meaning).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmexport import __version__
from vlmexport.errors import ParityError, UsageError, VlmExportError
from vlmexport.fsutil import atomic_file
from vlmexport.validate.metrics import Measurement
from vlmexport.validate.profiles import Profile

# 2: relative errors (rel_max, rel_mean) replace max_abs/mean_abs; top1 counts only clear-margin
# positions and says how many (`counted`, `positions`, `swing`); merge rows use the [merge] bounds;
# greedy caption `match` is up to the reference's first near-tie (`match_exact` beside it);
# `portability` (the int16 proof per graph) and `host` (CPU ISA, onnxruntime version) added.
REPORT_SCHEMA_VERSION = 2
STEP = re.compile(r" step \d+$")


@dataclass(frozen=True)
class CaptionResult:
    """One image's greedy tokens from the reference and from the bundle."""

    image: str
    reference: list[int]
    candidate: list[int]
    reference_text: str
    candidate_text: str

    @property
    def first_difference(self) -> int | None:
        """Index of the first token that differs (a length difference counts), or None if equal."""
        if self.reference == self.candidate:
            return None
        same = (a == b for a, b in zip(self.reference, self.candidate))
        return next((i for i, equal in enumerate(same) if not equal), min(len(self.reference), len(self.candidate)))


@dataclass
class CheckReport:
    """Every measurement of one check, with the captions behind the end-to-end numbers."""

    bundle: Path
    layout: str
    variant: str
    profile: Profile
    reference: str  # "pytorch" (the checkpoint) or "onnx fp32" (the bundle's own fp32 variant)
    images: list[str]
    measurements: list[Measurement]
    captions: list[CaptionResult]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what was not measured, and why
    portability: list[dict[str, Any]] = field(default_factory=list)  # per graph: the int16 proof (validate/portable.py)
    host: dict[str, Any] = field(default_factory=dict)  # CPU kind and onnxruntime version the numbers came from
    exact_captions: float | None = None  # greedy captions identical token for token (the verdict's match allows near-ties)

    @property
    def passed(self) -> bool:
        return bool(self.measurements) and all(m.passed for m in self.measurements)

    @property
    def failures(self) -> list[Measurement]:
        return [m for m in self.measurements if not m.passed]

    def parity_error(self) -> ParityError | None:
        """The worst failure as the error the CLI turns into exit code 1, or None if the check passed."""
        if self.passed:
            return None
        worst = max(self.failures, key=_badness) if self.failures else None
        if worst is None:
            return ParityError("check", "measurements", 0.0, 1.0, "nothing was measured; report this as a vlmexport bug")
        where = f" (batch {worst.batch})" if worst.batch else ""
        return ParityError(
            f"{worst.component} {worst.output}{where}",
            worst.metric,
            worst.value,
            worst.tolerance,
            f"{len(self.failures)} of {len(self.measurements)} measurements fail profile {self.profile.name!r}; see the table or --json report",
        )

    def summary(self) -> str:
        """One line: how many measurements passed, and the closest call or the worst failure."""
        if not self.measurements:
            return "nothing measured"
        # A passing portability proof is a kernel's fixed bound (MatMulNBits 8-bit: 32640 of
        # 32767 for every graph), not a close call about this bundle: named only when it fails.
        shown = [m for m in self.measurements if m.component != "portability" or not m.passed] or self.measurements
        worst = max(shown, key=_badness)
        verdict = "passed" if self.passed else f"{len(self.failures)} failed"
        return (
            f"{len(self.measurements)} measurements, {verdict}; worst {worst.component} {worst.output} "
            f"{worst.metric} {_number(worst.value)} ({'≥' if worst.higher_is_better else '≤'} {_number(worst.tolerance)})"
        )

    def manifest_entry(self) -> dict[str, Any]:
        """What the bundle's manifest keeps of this check, under `checks[variant]`."""
        return {
            "passed": self.passed,
            "profile": self.profile.name,
            "reference": self.reference,
            "summary": self.summary(),
            "failed": [_label(m) for m in self.failures],
            "images": len(self.images),
            "checked_at": _now(),
            "vlmexport": __version__,
            "portable": all(p["passed"] for p in self.portability),
            "portability": self.portability,
            "host": self.host,
        }

    def to_json(self) -> dict[str, Any]:
        """The report in the documented form (docs/report-schema.md)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "vlmexport": __version__,
            "checked_at": _now(),
            "bundle": str(self.bundle),
            "layout": self.layout,
            "variant": self.variant,
            "reference": self.reference,
            "profile": {"name": self.profile.name, "source": self.profile.source},
            "passed": self.passed,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "images": self.images,
            "measurements": [_measurement_json(m) for m in self.measurements],
            "captions": [_caption_json(c) for c in self.captions],
            "match_exact": self.exact_captions,
            "portability": self.portability,
            "host": self.host,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Row:
    """One table row: the worst of a measurement over batch sizes and decode steps."""

    component: str
    output: str
    metric: str
    value: float
    threshold: float
    higher_is_better: bool
    passed: bool
    where: str  # which batch (and step) the worst value came from
    counted: int | None = None  # clear-margin top-1: positions counted, over every batch and step ...
    positions: int | None = None  # ... of all positions compared

    @property
    def bound(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {_number(self.threshold)}"

    @property
    def shown_value(self) -> str:
        if self.counted is None:
            return _number(self.value)
        return f"{_number(self.value)} ({self.counted}/{self.positions} counted)"


def table_rows(report: CheckReport) -> list[Row]:
    """One row per component, output and metric — the worst over batches and cached steps —
    in the order measured; a failing measurement always makes its row fail."""
    groups: dict[tuple[str, str, str], list[Measurement]] = {}
    for m in report.measurements:
        groups.setdefault((STEP.sub(" steps", m.component), m.output, m.metric), []).append(m)
    rows = []
    for (component, output, metric), members in groups.items():
        worst = max(members, key=_badness)
        step = STEP.search(worst.component)
        where = ", ".join(part for part in (f"batch {worst.batch}" if worst.batch else "", step.group().strip() if step else "") if part)
        rows.append(
            Row(
                component, output, metric, worst.value, worst.tolerance, worst.higher_is_better, all(m.passed for m in members), where,
                *_counts(members),
            )
        )
    return rows


def _counts(members: list[Measurement]) -> tuple[int | None, int | None]:
    """Clear-margin top-1: positions counted and compared, summed over the group (None otherwise)."""
    counted = [m for m in members if m.counted is not None]
    if not counted:
        return None, None
    return sum(m.counted or 0 for m in counted), sum(m.positions or 0 for m in counted)


def write_report(report: CheckReport, path: Path) -> None:
    """Write the JSON report whole (CI may read it while a later run writes)."""
    _write_json(report.to_json(), path)


def write_error_report(error: VlmExportError, path: Path) -> None:
    """A JSON report for a check that could not run (bad input, integrity): passed false, the
    error and its exit code — so CI never reads a stale report from an earlier run."""
    _write_json(
        {
            "schema_version": REPORT_SCHEMA_VERSION,
            "vlmexport": __version__,
            "checked_at": _now(),
            "passed": False,
            "error": {"kind": type(error).__name__, "problem": error.problem, "fix": error.fix, "exit_code": error.exit_code},
        },
        path,
    )


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Raises:
        UsageError: the report cannot be written there.
    """
    try:
        # allow_nan=False: strict JSON; non-finite values were already turned into null.
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {path} ({exc.strerror})", "pass a --json path you can write to") from exc


def _badness(m: Measurement) -> float:
    """How close a measurement is to (or how far past) its bound: > 1 fails. Comparable across metrics."""
    if not math.isfinite(m.value):
        return math.inf
    if m.higher_is_better:
        # Distance below 1 (a perfect cosine or agreement) relative to the allowed distance.
        slack = 1.0 - m.tolerance
        return (1.0 - m.value) / slack if slack > 0 else (0.0 if m.value >= m.tolerance else math.inf)
    return m.value / m.tolerance if m.tolerance > 0 else (0.0 if m.value <= 0 else math.inf)


def _label(m: Measurement) -> str:
    return f"{m.component} {m.output} {m.metric}" + (f" batch {m.batch}" if m.batch else "")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if 0.99 <= abs(value) < 1:
        return f"{value:.7f}".rstrip("0").rstrip(".")  # cosines and agreement rates near 1 need their digits
    return f"{value:.3g}"


def _measurement_json(m: Measurement) -> dict[str, Any]:
    out = {
        "component": m.component,
        "output": m.output,
        "metric": m.metric,
        "batch": m.batch,
        "value": _finite(m.value),
        "threshold": m.tolerance,
        "bound": "min" if m.higher_is_better else "max",
        "passed": m.passed,
    }
    if m.counted is not None:  # clear-margin top-1
        out.update(counted=m.counted, positions=m.positions, swing=None if m.swing is None else _finite(m.swing))
    return out


def _caption_json(c: CaptionResult) -> dict[str, Any]:
    return {
        "image": c.image,
        "match": c.first_difference is None,
        "first_difference": c.first_difference,
        "reference": c.reference_text,
        "candidate": c.candidate_text,
        "reference_tokens": c.reference,
        "candidate_tokens": c.candidate,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
