"""The PyTorch reference captioner: distilvit's prefix-only generation, greedy by default."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from vlmexport.checkpoint.model import PrefixConditioningVLM
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
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be ≥ 0 (got {self.no_repeat_ngram_size})")
        if problems:
            raise UsageError("; ".join(problems), "fix the decoding options")

    def with_default_length(self, max_length: int) -> DecodeOptions:
        """These options with `max_new_tokens` filled in from the model's `max_length` if unset."""
        return self if self.max_new_tokens is not None else replace(self, max_new_tokens=int(max_length))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """(eos, pad) ids; pad falls back to eos as transformers' generate does."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return eos, pad


def strip_after_eos(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to and excluding the first EOS (what follows it is padding)."""
    return tokens[: tokens.index(eos)] if eos in tokens else list(tokens)


@torch.no_grad()
def generate_tokens(
    model: PrefixConditioningVLM,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: np.ndarray | torch.Tensor,
    options: DecodeOptions = DecodeOptions(),
) -> list[list[int]]:
    """Token ids per image, as distilvit generates them: projected vision features as
    `inputs_embeds`, an all-ones attention mask, no prompt and no BOS. EOS is stripped."""
    pixels = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    prefix = model.prefix_embeddings(pixels)
    eos, pad = special_ids(tokenizer)
    options = options.with_default_length(model.config.max_length)
    sampling, beams = options.do_sample, options.num_beams > 1
    # Options of the mode in use are explicit (a None is filled from transformers' global
    # defaults, e.g. top_k=50); the others stay None, which transformers would warn about.
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_k=options.top_k if sampling else None,
        top_p=options.top_p if sampling else None,
        length_penalty=options.length_penalty if beams else None,
        early_stopping=options.early_stopping if beams else None,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    out = model.language_model.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
    return [strip_after_eos(row.tolist(), eos) for row in out]


def decode(tokenizer: PreTrainedTokenizerBase, tokens: list[list[int]]) -> list[str]:
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


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
    stopping = {"true": True, "false": False, "never": "never"}
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
