"""Cache tensor names (optimum's convention), in a module free of torch so that the ONNX
runtime can import them without loading PyTorch."""

from __future__ import annotations


def past_names(n: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def present_names(n: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
