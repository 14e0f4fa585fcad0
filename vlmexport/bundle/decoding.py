"""Decoding options with transformers' `generate` meanings, shared by the numpy runtime, the
server and the PyTorch reference; free of torch so a runtime-only install can use them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vlmexport.errors import UsageError

EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class DecodeOptions:
    """How to pick tokens, with transformers' `generate` meanings. Greedy unless beams or
    sampling are asked for; `max_new_tokens=None` means the model's `max_length`.

    Raises:
        UsageError: a value transformers would reject (checked on construction).
    """

    max_new_tokens: int | None = None
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off (transformers' own default of 50 is not applied)
    top_p: float = 1.0
    seed: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1 (got {self.num_beams})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); for greedy decoding leave sampling off")
        if self.top_k < 0:
            problems.append(f"top_k must be ≥ 0 (got {self.top_k}; 0 turns it off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not math.isfinite(self.length_penalty):
            problems.append(f"length_penalty must be finite (got {self.length_penalty})")
        if self.early_stopping not in EARLY_STOPPING or not isinstance(self.early_stopping, bool | str):
            problems.append(f"early_stopping must be true, false or never (got {self.early_stopping!r})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be from 0 to 2**63 - 1 (got {self.seed})")  # numpy's generators refuse negative seeds
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be ≥ 0 (got {self.no_repeat_ngram_size})")
        if problems:
            raise UsageError("; ".join(problems), "fix the decoding options")

    def with_default_length(self, max_length: int) -> DecodeOptions:
        """These options with `max_new_tokens` filled in from the model's `max_length` if unset."""
        return self if self.max_new_tokens is not None else replace(self, max_new_tokens=int(max_length))


def strip_after_eos(tokens: list[int], eos: int | None, keep_eos: bool = False) -> list[int]:
    """Tokens up to and excluding the first EOS (what follows it is padding), or including it
    with `keep_eos` (the positions a caption's generation computed)."""
    return tokens[: tokens.index(eos) + int(keep_eos)] if eos in tokens else list(tokens)


def options_from_flags(
    *,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    length_penalty: float | None = None,
    early_stopping: str | None = None,
    no_repeat_ngram_size: int = 0,
) -> DecodeOptions:
    """DecodeOptions from command-line flags, where None means "not given".

    Raises:
        UsageError: a sampling flag without `do_sample`, a beam flag without `num_beams` ≥ 2,
            or a value DecodeOptions rejects.
    """
    sampling = {"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--seed": seed}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given and not do_sample:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to sampling", "add --do-sample, or drop them for greedy decoding")
    beam = {"--length-penalty": length_penalty, "--early-stopping": early_stopping}
    given = [flag for flag, value in beam.items() if value is not None]
    if given and num_beams < 2:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to beam search", "add --num-beams N with N ≥ 2, or drop them")
    stopping: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}
    if early_stopping is not None and early_stopping.lower() not in stopping:
        raise UsageError(f"--early-stopping {early_stopping!r} is not one of true, false, never", "pass --early-stopping true|false|never")
    return DecodeOptions(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=1.0 if temperature is None else temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        length_penalty=1.0 if length_penalty is None else length_penalty,
        early_stopping=stopping[early_stopping.lower()] if early_stopping is not None else False,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
