"""Exception types of `passes`: one per category, each message names the place and the value.

Every error a user can cause derives from `PassesError`, so callers (and the command line) can
catch the family and print a one-line message instead of a traceback.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: what messages quote of an error underneath."""
    return (str(e).strip().splitlines() or [""])[0]


class PassesError(Exception):
    """Base class of every error `passes` raises on purpose."""


class InputError(PassesError, ValueError):
    """A bad argument: ratio, round_to, an ignored layer, example inputs, dtype, ..."""


class TraceError(PassesError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class AnalysisError(PassesError):
    """The channel analysis met something it cannot represent."""


class RewriteError(PassesError):
    """The rewritten graph does not have the shapes the plan promised (an internal bug; never silent)."""


class PlanError(PassesError):
    """A saved plan does not fit the model it is applied to."""


class VerificationError(PassesError):
    """The pruned model failed the forward/shape check or masked equivalence."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ExportError(PassesError):
    """ONNX export, the ONNX checker or shape inference failed."""


class ParityError(PassesError):
    """ONNX Runtime disagrees with torch beyond the tolerance."""
