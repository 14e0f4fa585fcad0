"""Cache tensor and dynamic axis names (optimum's convention), in a module free of torch so
that the ONNX runtime and graph post-processing can import them without loading PyTorch."""

from __future__ import annotations

BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"
PREFIX = "prefix_length"
LOGITS = "logits_length"


def past_names(n: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def present_names(n: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
