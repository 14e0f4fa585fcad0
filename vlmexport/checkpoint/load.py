"""Load a distilvit checkpoint folder strictly: every key accounted for, or an error naming them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.initialization import no_init_weights

from vlmexport.bundle.preprocess import Preprocessor, load_preprocessor
from vlmexport.checkpoint.config import VLMConfig, read_config
from vlmexport.checkpoint.model import PrefixConditioningVLM, build_model
from vlmexport.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin")
LORA_MARKER = ".lora_A."
MAX_NAMED_KEYS = 5


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and everything needed to run it."""

    path: Path
    config: VLMConfig
    model: PrefixConditioningVLM
    tokenizer: PreTrainedTokenizerBase
    preprocessor: Preprocessor


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:MAX_NAMED_KEYS])
    more = len(keys) - MAX_NAMED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def read_state_dict(model_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the checkpoint's weights: safetensors, or a pickle only when explicitly allowed.

    Raises:
        CheckpointError: no weights, pickle without permission, truncated or corrupt file.
    """
    path = model_dir / WEIGHTS_NAME
    if not path.is_file():
        pickles = [model_dir / n for n in PICKLE_NAMES if (model_dir / n).is_file()]
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]} is a pickle, which can run arbitrary code when loaded",
                "convert it to model.safetensors, or pass --allow-pickle if you trust its source",
            )
        if pickles:
            try:
                return torch.load(pickles[0], map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{pickles[0]} cannot be read ({exc})", "re-save the checkpoint") from exc
        raise CheckpointError(f"{path} is missing", "a distilvit checkpoint folder holds model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        # Copied out of the file one tensor at a time, each mapping closed straight after:
        # safetensors' tensors are views of a map of the whole file whose touched pages count
        # as this process's memory until every tensor is gone, so `export` could not release
        # the vision encoder before exporting the decoder. Peak: the weights once.
        state = {}
        for key in keys:
            with safe_open(str(path), framework="pt") as handle:
                state[key] = handle.get_tensor(key).clone()
        return state
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({exc})", "re-copy or re-save model.safetensors"
        ) from exc


def _submodels(model: PrefixConditioningVLM) -> dict[str, PreTrainedModel]:
    """transformers sub-models by state-dict prefix (their legacy key renames apply below it)."""
    prefix = "language_model.base_model.model." if model.has_lora else "language_model."
    return {"vision_encoder.": model.vision_encoder, prefix: model.causal_lm}


def _legacy_renames(model: PrefixConditioningVLM) -> dict[str, list[tuple[re.Pattern[str], str]]]:
    """transformers' own conversion table for checkpoints written by older releases
    (e.g. 4.x SigLIP `vision_model.*`, flattened in 5.x), restricted to pure renames,
    in transformers' order, per state-dict prefix."""
    renames: dict[str, list[tuple[re.Pattern[str], str]]] = {}
    for prefix, sub in _submodels(model).items():
        rules = renames.setdefault(prefix, [])
        for key in (type(sub).__name__, sub.config.model_type):
            for rule in get_checkpoint_conversion_mapping(key) or []:
                if not isinstance(rule, WeightRenaming) or len(rule.source_patterns) != len(rule.target_patterns):
                    continue  # converters reshape tensors; a strict loader does not guess at them
                for src, dst in zip(rule.source_patterns, rule.target_patterns, strict=True):
                    rules.append((re.compile(src), dst))
    return renames


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    # As transformers does: every matching rule fires in turn (they chain, e.g. ViT's
    # `encoder.layer.` → `layers.` then `attention.query` → `q_proj`), first match only.
    for pattern, target in rules:
        key = pattern.sub(target, key, count=1)
    return key


def normalise_keys(state: dict[str, torch.Tensor], model: PrefixConditioningVLM) -> dict[str, torch.Tensor]:
    """Map 4.x key names onto the names the current transformers model uses."""
    expected = set(model.state_dict())
    renames = _legacy_renames(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new_key = key
        if key not in expected:
            for prefix, rules in renames.items():
                if rules and key.startswith(prefix):
                    candidate = prefix + _rename(key[len(prefix) :], rules)
                    if candidate in expected:
                        new_key = candidate
                    break
        out[new_key] = tensor
    return out


def ignorable_keys(model: PrefixConditioningVLM) -> tuple[list[re.Pattern[str]], dict[str, str]]:
    """Keys transformers itself declares ignorable (old buffers) and tied weights (may be absent)."""
    ignore: list[re.Pattern[str]] = []
    tied: dict[str, str] = {}
    for prefix, sub in _submodels(model).items():
        for pattern in getattr(sub, "_keys_to_ignore_on_load_unexpected", None) or []:
            ignore.append(re.compile(re.escape(prefix) + ".*" + pattern))
        if getattr(sub.config, "tie_word_embeddings", False):
            for target, source in (getattr(sub, "_tied_weights_keys", None) or {}).items():
                tied[prefix + target] = prefix + source
    return ignore, tied


def load_weights_strictly(model: PrefixConditioningVLM, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model`; any missing or unexpected key is an error naming them.

    Raises:
        CheckpointError: missing/unexpected keys or shape mismatches.
    """
    state = normalise_keys(state, model)
    ignore, tied = ignorable_keys(model)
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected and not any(p.search(k) for p in ignore)]
    missing = [k for k in expected if k not in state and k not in tied]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_name_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_name_keys(unexpected)}")
        raise CheckpointError(
            "weights do not match the config: " + "; ".join(parts),
            "check that config.json belongs to these weights (vision/text configs, projection_type, LoRA settings)",
        )
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} weight(s) have the wrong shape, e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}",
            "check that config.json belongs to these weights",
        )
    full = {k: state[k] for k in expected if k in state}
    for target, source in tied.items():
        full.setdefault(target, full[source])
    # assign: the tensors read from the file become the parameters (no second copy of the weights).
    model.load_state_dict(full, strict=True, assign=True)
    model.causal_lm.tie_weights()  # the head becomes the embedding's own Parameter (tested)


def has_lora_keys(state: dict[str, torch.Tensor]) -> bool:
    return any(LORA_MARKER in key for key in state)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, read from local files only.

    Raises:
        CheckpointError: no tokenizer files in the folder.
    """
    from transformers import PreTrainedTokenizerFast

    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json", "save the tokenizer beside the model (tokenizer.save_pretrained)")
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)


def load_checkpoint(model_dir: Path | str, allow_pickle: bool = False) -> Checkpoint:
    """Read config, weights (strictly), tokenizer and preprocessing of a distilvit checkpoint.

    Raises:
        CheckpointError: anything about the folder that stops it loading exactly.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    state = read_state_dict(model_dir, allow_pickle)
    with_lora = has_lora_keys(state)
    try:
        # Every parameter is replaced by the file's tensor below: drawing random weights first
        # would cost seconds and, since it touches every page, a second model's worth of memory.
        with no_init_weights():
            model = build_model(config, with_lora=with_lora)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"config.json cannot build the model ({exc})", "check vision_config and text_config") from exc
    load_weights_strictly(model, state)
    tokenizer = load_tokenizer(model_dir)
    preprocessor = load_preprocessor(model_dir, config.vision_config)
    return Checkpoint(model_dir, config, model, tokenizer, preprocessor)


