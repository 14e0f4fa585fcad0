"""The calls every model runner offers: the ONNX bundle and the PyTorch reference alike."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """What both `runtime.bundle.Bundle` and `validate.reference.TorchRunner` offer: every call
    the decoding loops, check, the smoke parity and quantize make on either. Both classes
    subclass it explicitly, so the type checker proves they implement all of it."""

    def prefix(self, pixel_values: np.ndarray) -> np.ndarray: ...
    def vision(self, pixel_values: np.ndarray) -> np.ndarray: ...
    def project(self, hidden: np.ndarray) -> np.ndarray: ...
    def first_pass(self, prefix: np.ndarray, input_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]: ...
    def step(self, input_ids: np.ndarray, past: list[np.ndarray], position_offset: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]: ...
