"""A bundle opened in ONNX Runtime, hiding the layout behind two calls: first pass and step."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmexport.bundle.manifest import Manifest, projection_in_vision, read_manifest
from vlmexport.bundle.names import past_names
from vlmexport.errors import BundleError
from vlmexport.runtime.runner import Runner

Past = list[np.ndarray]


# Components that run once per caption. Each session has its own thread pool, whose threads
# spin for a while after every run; the vision encoder's spinning stole the cores from the
# decoder's first pass that follows it (full-size int8, 2 threads: first pass 97 → 49 ms,
# caption 411 → 345 ms; fp32 776 → 660 ms). The decoder, run token after token, keeps spinning.
RUN_ONCE = ("vision_encoder", "projection", "prefix_init")


def session(path: Path | bytes, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """A CPU session over a file (or a serialised graph); raises BundleError if ONNX Runtime cannot load it."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, unexported, exception types
        message = str(exc).splitlines()[0]
        fix = f"upgrade onnxruntime ({ort.__version__} here) or re-export with --opset 18" if "opset" in message.lower() else "re-export the bundle"
        name = "a graph built in memory" if isinstance(path, bytes) else path.name
        raise BundleError(f"ONNX Runtime cannot load {name} ({message[:200]})", fix) from exc


@dataclass
class Bundle(Runner):
    """Sessions of one variant of a bundle."""

    path: Path
    manifest: Manifest
    variant: str
    sessions: dict[str, ort.InferenceSession]

    @property
    def num_layers(self) -> int:
        return int(self.manifest.model["num_layers"])

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """The vision encoder's output: hidden states, or the prefix where it includes the projection."""
        return self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def project(self, hidden: np.ndarray) -> np.ndarray:
        if projection_in_vision(self.manifest.layout):
            return hidden  # the vision encoder projected it already (the transformers.js layout)
        return self.sessions["projection"].run(None, {"vision_hidden_states": hidden})[0]

    def prefix(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.project(self.vision(pixel_values))

    def empty_past(self, batch: int) -> Past:
        heads, dim = int(self.manifest.model["kv_heads"]), int(self.manifest.model["head_dim"])
        return [np.zeros((batch, heads, 0, dim), np.float32) for _ in range(2 * self.num_layers)]

    def first_pass(self, prefix: np.ndarray, input_ids: np.ndarray | None = None) -> tuple[np.ndarray, Past]:
        """Prefix (and optional prompt ids) with an empty past → (logits, present)."""
        batch, length = prefix.shape[0], prefix.shape[1]
        ids = np.zeros((batch, 0), np.int64) if input_ids is None else input_ids.astype(np.int64)
        if self.manifest.layout == "distilvit":
            out = self.sessions["prefix_init"].run(None, {"prefix_embeddings": prefix, "input_ids": ids})
            return out[0], out[1:]
        total = length + ids.shape[1]
        if self.manifest.layout == "transformers.js":
            embeds = np.concatenate([prefix, self._embed(ids)], axis=1) if ids.shape[1] else prefix
            # Logits for the positions that predict a token: the last prefix one and each id.
            return self._embeds_pass(embeds, self.empty_past(batch), 0, 1 + ids.shape[1])
        feeds = {
            "prefix_embeddings": prefix,
            "input_ids": ids,
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.broadcast_to(np.arange(total, dtype=np.int64), (batch, total)).copy(),
            **dict(zip(past_names(self.num_layers), self.empty_past(batch))),
        }
        out = self.sessions["decoder"].run(None, feeds)
        return out[0], out[1:]

    def step(self, input_ids: np.ndarray, past: Past, position_offset: int | None = None) -> tuple[np.ndarray, Past]:
        """Ids after a cached past → (logits, present). Positions continue from the past length
        unless `position_offset` overrides it (used by tests to prove an off-by-one is caught)."""
        batch, count = input_ids.shape
        past_len = past[0].shape[2]
        start = past_len if position_offset is None else position_offset
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + count), np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + count, dtype=np.int64), (batch, count)).copy(),
            **dict(zip(past_names(self.num_layers), past)),
        }
        if self.manifest.layout == "distilvit":
            out = self.sessions["language_model"].run(None, feeds)
        elif self.manifest.layout == "transformers.js":
            return self._embeds_pass(self._embed(input_ids.astype(np.int64)), past, start, count)
        else:
            feeds["prefix_embeddings"] = np.zeros((batch, 0, int(self.manifest.model["embed_dim"])), np.float32)
            out = self.sessions["decoder"].run(None, feeds)
        return out[0], out[1:]

    def _embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(None, {"input_ids": input_ids})[0]

    def _embeds_pass(self, embeds: np.ndarray, past: Past, start: int, keep: int) -> tuple[np.ndarray, Past]:
        """transformers.js' decoder_model_merged over `embeds` after `past`, positions from
        `start`, logits for the last `keep` positions."""
        batch, count = embeds.shape[:2]
        past_len = past[0].shape[2]
        feeds = {
            "inputs_embeds": embeds.astype(np.float32),
            "attention_mask": np.ones((batch, past_len + count), np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + count, dtype=np.int64), (batch, count)).copy(),
            "num_logits_to_keep": np.array(keep, np.int64),
            **dict(zip(past_names(self.num_layers), past)),
        }
        out = self.sessions["decoder_model_merged"].run(None, feeds)
        return out[0], out[1:]


def open_bundle(bundle_dir: Path | str, variant: str = "fp32", threads: int | None = None, components: Collection[str] | None = None) -> Bundle:
    """Open every component of `variant` (or only `components`, to hold fewer graphs in memory).

    Raises:
        BundleError: no manifest, unknown variant, or a graph ONNX Runtime cannot load.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    manifest.component_file("vision_encoder", variant)  # raises for a variant the bundle lacks
    sessions = {}
    for component, relative in manifest.variants[variant].items():
        if components is not None and component not in components:
            continue
        path = bundle_dir / relative
        if not path.is_file():
            raise BundleError(f"{relative} is missing from the bundle", "re-run `vlmexport export`")
        sessions[component] = session(path, threads, spin=component not in RUN_ONCE)
        _check_layers(sessions[component], relative, manifest)
    return Bundle(bundle_dir, manifest, variant, sessions)


def _check_layers(graph: ort.InferenceSession, relative: str, manifest: Manifest) -> None:
    """A graph's cache inputs are the manifest's layers: the runtime feeds one past per layer it
    reads there, and onnxruntime would otherwise fail mid-caption with a traceback.

    Raises:
        BundleError: the graph's layers and the manifest's num_layers differ.
    """
    layers = {name.split(".")[1] for name in (i.name for i in graph.get_inputs()) if name.startswith("past_key_values.")}
    if layers and len(layers) != manifest.model["num_layers"]:
        raise BundleError(
            f"{relative} takes the past of {len(layers)} layers but the manifest says num_layers {manifest.model['num_layers']}",
            "re-export the bundle, or restore its vlmexport.json",
        )
