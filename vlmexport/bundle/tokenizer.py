"""The bundle's tokenizer, read with the `tokenizers` package alone (no transformers).

Decoding reproduces `PreTrainedTokenizerFast.decode(ids, skip_special_tokens=True)` of
transformers 5: the special tokens are those tokenizer.json marks special plus the ones
tokenizer_config.json names (transformers registers those as special on load), and the
optional `clean_up_tokenization_spaces` rewrite is applied as transformers applies it (never
to BPE models). A test holds the two equal on the example's and the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from vlmexport.errors import BundleError

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# tokenizer_config.json keys transformers reads as special tokens.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")
# transformers' `clean_up_tokenization`, in its order.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenDecoder(Protocol):
    """What `decode` needs: this module's tokenizer and transformers' tokenizers alike."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class BundleTokenizer:
    """A tokenizer.json with the special-token facts of its tokenizer_config.json."""

    core: Tokenizer
    special_ids: frozenset[int]
    eos_token_id: int | None
    pad_token_id: int | None
    clean_up_spaces: bool

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(t) for t in token_ids if not (skip_special_tokens and int(t) in self.special_ids)]
        text = self.core.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the post-processor's special tokens."""
        return self.core.encode(text, add_special_tokens=False).ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_specials(config: dict[str, Any]) -> list[str]:
    names = [_token_text(config.get(key)) for key in SPECIAL_KEYS]
    for key in LIST_KEYS:
        values = config.get(key) or []
        names += [_token_text(v) for v in (values.values() if isinstance(values, dict) else values)]
    names += [_token_text(v) for v in (config.get("added_tokens_decoder") or {}).values() if isinstance(v, dict) and v.get("special")]
    return [n for n in names if n]


def _ids(core: Tokenizer, names: Iterable[str | None]) -> set[int]:
    return {i for i in (core.token_to_id(n) for n in names if n) if i is not None}


def load_tokenizer(folder: Path | str) -> BundleTokenizer:
    """The tokenizer of a bundle (or checkpoint) folder, from local files only.

    Raises:
        BundleError: no tokenizer.json, or it or tokenizer_config.json cannot be read.
    """
    folder = Path(folder)
    path = folder / TOKENIZER_NAME
    if not path.is_file():
        raise BundleError(f"{folder} has no {TOKENIZER_NAME}", "save the tokenizer beside the model (tokenizer.save_pretrained), or re-run `vlmexport export`")
    try:
        core = Tokenizer.from_file(str(path))
        config_path = folder / TOKENIZER_CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{TOKENIZER_CONFIG_NAME} is not a JSON object")
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise BundleError(f"the tokenizer in {folder} cannot be read ({str(exc).splitlines()[0][:200]})", "re-save the tokenizer, or re-run `vlmexport export`") from exc
    specials = {i for i, token in core.get_added_tokens_decoder().items() if token.special} | _ids(core, _named_specials(config))
    eos = _ids(core, [_token_text(config.get("eos_token"))])
    pad = _ids(core, [_token_text(config.get("pad_token"))])
    # Only when asked for: serialising a 49k-token vocabulary to read its model type costs start-up time.
    clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and json.loads(core.to_str()).get("model", {}).get("type") != "BPE"
    return BundleTokenizer(
        core=core,
        special_ids=frozenset(specials),
        eos_token_id=next(iter(eos), None),
        pad_token_id=next(iter(pad), None),
        clean_up_spaces=clean_up,
    )


def decode(tokenizer: TokenDecoder, tokens: list[list[int]]) -> list[str]:
    """One caption per row of token ids: special tokens skipped, surrounding spaces stripped."""
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
