"""The fields POST /caption accepts: one table that both validates a request and writes its
OpenAPI description, so the two cannot drift.

Validation is strict: a value must parse exactly (no `maybe` read as false, no `inf` or
`nan`), lie in its range, and belong to the decoding mode asked for (sampling fields need
do_sample=true, beam fields num_beams ≥ 2). Every problem names its field. The caps on
num_beams and max_new_tokens bound one request's work: with 100 beams and 100,000 tokens a
caption took 15.6 s and 1.33 GB (measured on the standard-library server this replaced).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.errors import UsageError

SEED_MAX = 2**32 - 1  # numpy's default_rng takes any non-negative int; a JSON client's safe range is smaller
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class FieldError(UsageError):
    """A form field or query parameter with a bad value; `field` names it."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(problem, fix)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_new_tokens: int  # the model's max_length unless the server was told otherwise
    max_beams: int = 4


@dataclass(frozen=True)
class Field:
    """One accepted field: its OpenAPI type, a description, and its parser (raw text → value)."""

    name: str
    kind: str  # "integer" | "number" | "boolean" | "string"
    description: str
    parse: Callable[[str, str, Limits], Any]
    mode: str = ""  # "sample" | "beam": only meaningful in that decoding mode


def _integer(low: int, high: Callable[[Limits], int] | int) -> Callable[[str, str, Limits], int]:
    def parse(name: str, raw: str, limits: Limits) -> int:
        top = high(limits) if callable(high) else high
        text = raw.strip()
        # int() alone would take "1_000" and " 7 "; only plain decimal digits are accepted.
        if re.fullmatch(r"-?[0-9]{1,20}", text) is None:
            raise FieldError(name, f"{name} must be an integer from {low} to {top} (got {_shown(raw)})", f"send {name} as a whole number")
        value = int(text)
        if not low <= value <= top:
            raise FieldError(name, f"{name} must be from {low} to {top} (got {value})", f"send {name} within that range")
        return value

    return parse


def _number(low: float, high: float, low_open: bool) -> Callable[[str, str, Limits], float]:
    def parse(name: str, raw: str, limits: Limits) -> float:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        try:
            value = float(raw.strip())
        except ValueError:
            raise FieldError(name, f"{name} must be a number in {interval} (got {_shown(raw)})", f"send {name} as a decimal number") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise FieldError(name, f"{name} must be a finite number in {interval} (got {_shown(raw)})", f"send {name} within that range")
        return value

    return parse


def _boolean(name: str, raw: str, limits: Limits) -> bool:
    text = raw.strip().lower()
    if text not in TRUE + FALSE:
        raise FieldError(name, f"{name} must be true or false (got {_shown(raw)})", f"send {name}=true or {name}=false")
    return text in TRUE


def _early_stopping(name: str, raw: str, limits: Limits) -> bool | str:
    text = raw.strip().lower()
    if text == "never":
        return "never"
    if text not in TRUE + FALSE:
        raise FieldError(name, f"{name} must be true, false or never (got {_shown(raw)})", f"send {name}=true, false or never")
    return text in TRUE


def _text(name: str, raw: str, limits: Limits) -> str:
    if not raw or len(raw) > 32 or not raw.replace("_", "").isalnum():
        raise FieldError(name, f"{name} must be a variant name such as fp32 or int8 (got {_shown(raw)})", "send a variant the bundle has")
    return raw


FIELDS: tuple[Field, ...] = (
    Field("variant", "string", "bundle variant: fp32 (default), int8, ... (see GET /health)", _text),
    Field("max_new_tokens", "integer", "tokens to generate at most (default and cap: the model's max_length)", _integer(1, lambda lim: lim.max_new_tokens)),
    Field("num_beams", "integer", "beam search with N beams (1: greedy or sampling; capped by the server)", _integer(1, lambda lim: lim.max_beams)),
    Field("do_sample", "boolean", "sample instead of taking the most likely token", _boolean),
    Field("temperature", "number", "sampling temperature in (0, 100]", _number(0.0, 100.0, low_open=True), mode="sample"),
    Field("top_k", "integer", "sample among the K most likely tokens (0: off)", _integer(0, 1_000_000), mode="sample"),
    Field("top_p", "number", "sample among the most likely tokens of total probability P, in (0, 1]", _number(0.0, 1.0, low_open=True), mode="sample"),
    Field("seed", "integer", f"sampling seed, 0 to {SEED_MAX} (same seed, same caption)", _integer(0, SEED_MAX), mode="sample"),
    Field("length_penalty", "number", "beam score / length ** P, in [-10, 10]", _number(-10.0, 10.0, low_open=False), mode="beam"),
    Field("early_stopping", "string", "beam search: true, false or never", _early_stopping, mode="beam"),
    Field("no_repeat_ngram_size", "integer", "never repeat an n-gram of this size (0: off)", _integer(0, 16)),
)
BY_NAME = {f.name: f for f in FIELDS}


def parse_fields(raw: Mapping[str, str], limits: Limits) -> tuple[str, DecodeOptions]:
    """(variant, decoding options) from form fields and query parameters.

    Raises:
        FieldError: an unknown field, a value that does not parse or is out of range, or a field
            of a decoding mode not asked for (temperature without do_sample=true, ...).
    """
    unknown = sorted(set(raw) - set(BY_NAME))
    if unknown:
        # Named, but only a few and shortened: a request with thousands of odd fields must not
        # get them all echoed back (or into the log).
        shown = ", ".join(_shown(name) for name in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise FieldError(unknown[0], f"unknown field(s) {shown}", f"use {', '.join(BY_NAME)}")
    values = {name: BY_NAME[name].parse(name, text, limits) for name, text in raw.items()}
    variant = values.pop("variant", "fp32")
    if values.get("do_sample") is not True:
        _refuse_mode(values, "sample", "add do_sample=true, or drop them for greedy decoding")
    if values.get("num_beams", 1) < 2:
        _refuse_mode(values, "beam", "add num_beams=N with N ≥ 2, or drop them")
    return variant, DecodeOptions(**{**values, "max_new_tokens": values.get("max_new_tokens", limits.max_new_tokens)})


def _refuse_mode(values: dict[str, Any], mode: str, fix: str) -> None:
    stray = [name for name in values if BY_NAME[name].mode == mode]
    if stray:
        what = "sampling" if mode == "sample" else "beam search"
        raise FieldError(stray[0], f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} only to {what}", fix)


def _shown(raw: str) -> str:
    """A client's text as it may appear in an answer: short, control characters escaped."""
    return repr(raw[:40] + ("…" if len(raw) > 40 else ""))


def openapi_properties(limits: Limits) -> dict[str, dict[str, Any]]:
    """Every field as an OpenAPI schema property (integers with their bounds as this server sets them)."""
    properties: dict[str, dict[str, Any]] = {}
    for f in FIELDS:
        schema: dict[str, Any] = {"type": f.kind, "description": f.description}
        if f.name == "max_new_tokens":
            schema |= {"minimum": 1, "maximum": limits.max_new_tokens}
        elif f.name == "num_beams":
            schema |= {"minimum": 1, "maximum": limits.max_beams}
        properties[f.name] = schema
    return properties
