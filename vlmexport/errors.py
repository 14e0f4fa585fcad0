"""The one family of errors the library raises; the CLI maps them to exit codes.

Every error carries a problem and, where there is one, the fix, so the CLI can
print a single line without a traceback.
"""

from __future__ import annotations

EXIT_PARITY = 1
EXIT_USAGE = 2


class VlmExportError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = EXIT_USAGE

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class UsageError(VlmExportError):
    """Bad arguments or an output location that cannot be used."""


class CheckpointError(VlmExportError):
    """The input checkpoint folder cannot be read as a distilvit checkpoint."""


class BundleError(VlmExportError):
    """An ONNX bundle is missing, incomplete, or does not match its manifest."""


class ImageError(VlmExportError):
    """An input image cannot be read."""


class ParityError(VlmExportError):
    """An exported output differs from the PyTorch reference beyond tolerance."""

    exit_code = EXIT_PARITY

    def __init__(self, output: str, metric: str, value: float, tolerance: float, fix: str | None = None) -> None:
        self.output, self.metric, self.value, self.tolerance = output, metric, value, tolerance
        # Three significant digits, or as many as it takes to tell the two apart (a cosine of
        # 0.99989 against its bound 0.9999 read "cosine = 1 is outside tolerance 1").
        digits = next((d for d in range(3, 10) if f"{value:.{d}g}" != f"{tolerance:.{d}g}"), 3)
        super().__init__(f"{output}: {metric} = {value:.{digits}g} is outside tolerance {tolerance:.{digits}g}", fix)
