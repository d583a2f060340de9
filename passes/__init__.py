"""passes: structured pruning as a torch.fx graph pass.

    result = passes.prune(model, example_inputs, ratio=0.5)
    result.model            # physically smaller nn.Module, called like the original
    result.plan.save(path)  # re-apply with passes.apply_plan(fresh_model, Plan.load(path), inputs)
    result.report           # params/MACs before and after, widths, pinned channels, verify verdict
"""

from .api import LayerWidth, PruneResult, Report, analyze, apply_plan, prune
from .bench import BenchReport, benchmark
from .channels import ChannelGraph
from .count import count
from .errors import (AnalysisError, ExportError, InputError, ParityError, PassesError, PlanError,
                     RewriteError, TraceError, VerificationError)
from .export import ExportResult, export_onnx
from .plan import Plan
from .verify import VerifyReport, verify

__all__ = [
    "prune", "analyze", "apply_plan", "verify", "count", "export_onnx", "benchmark", "Plan",
    "PruneResult", "Report", "LayerWidth", "ChannelGraph", "VerifyReport", "ExportResult", "BenchReport",
    "PassesError", "InputError", "TraceError", "AnalysisError", "RewriteError", "PlanError",
    "VerificationError", "ExportError", "ParityError",
]
