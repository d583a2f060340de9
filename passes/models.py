"""Model specs and example inputs for the command line.

`load_model(spec)` turns a MODEL argument into an nn.Module in eval mode:

- `torchvision:NAME`: `torchvision.models.get_model(NAME, weights=None)` (googlenet and
  inception_v3 also get `aux_logits=False, init_weights=False`), all-zero weight matrices
  re-drawn (`torchvision_model`); a bare NAME that is a torchvision model and not a file is
  accepted too;
- `path/to/file.py:factory`: the file is imported (its folder first on sys.path while it runs)
  and `factory()` is called; a class is a factory too;
- `package.module:factory`: `importlib.import_module`, then `factory()`;
- `model.pt` (or .pth): a whole model saved with `torch.save(model, path)`, loaded with
  `torch.load(path, weights_only=False)`, which runs pickle: only load files you trust.

Every way a spec can be wrong raises `ModelSpecError` (an `InputError`) whose message says
what was wrong and what to do. `parse_shapes("1,3,224,224")` and `make_inputs(shapes, seed)`
turn `--input-shape` into seeded `torch.randn` tensors (`;` separates several inputs);
`check_runs` runs the model once on them, so a wrong shape is reported as the model's own
error before any tracing.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, first_line

FORMS = ("torchvision:NAME, path/to/file.py:factory, package.module:factory "
         "or a whole model saved with torch.save (.pt)")
_TORCHVISION_EXTRA = {"googlenet": dict(aux_logits=False, init_weights=False),
                      "inception_v3": dict(aux_logits=False, init_weights=False)}
_MAX_ELEMENTS = 1 << 30  # one input of 4 GiB float32 is surely a typo


class ModelSpecError(InputError):
    """A MODEL argument that names no model, or whose factory fails or returns no nn.Module."""

    says_what_to_do = True  # the message ends with the fix; the command line adds no hint


class ShapeError(InputError):
    """A malformed --input-shape, or one the model does not run on."""

    says_what_to_do = True


def check_runs(model: nn.Module, inputs: tuple, shapes: list, list_input: bool = False) -> None:
    """One eval-mode forward on the example inputs (the model's positional arguments); a model
    that raises gives a ShapeError."""
    from .trace import eval_mode

    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except Exception as e:  # noqa: BLE001 - whatever the forward raises
        given = f"--input-shape {format_shapes(shapes)}" + (" as one list (--list-input)" if list_input else "")
        raise ShapeError(f"{type(model).__name__} does not run on {given}: {type(e).__name__}: "
                         f"{first_line(e)}; pass the shape the model expects with --input-shape"
                         + ("" if list_input else " (--list-input if it takes a list of tensors)")) from e


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    name: str  # short name for folders and reports: "resnet18", "MnistNet", "model" (model.pt)
    spec: str


def load_model(spec: str) -> LoadedModel:
    """MODEL argument -> module in eval mode (see the module docstring for the forms)."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError(f"empty MODEL; pass one of {FORMS}")
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        return LoadedModel(_torchvision(name), name, spec)
    source, _, factory = spec.rpartition(":")
    if source.endswith(".py") or spec.endswith(".py"):
        if not factory or spec.endswith(".py"):
            raise ModelSpecError(f"model spec {spec!r} names a Python file but no factory; "
                                 f"write it as {spec.rstrip(':')}:factory (a function or class)")
        module = _import_file(Path(source), spec)
        return LoadedModel(_call_factory(module, factory, spec), _short(factory), spec)
    path = Path(spec)
    if path.suffix in (".pt", ".pth") or path.is_file():
        return LoadedModel(_load_saved(path, spec), _short(path.stem), spec)
    if source and re.fullmatch(r"[A-Za-z_][\w.]*", source):
        module = _import_module(source, spec)
        return LoadedModel(_call_factory(module, factory, spec), _short(factory), spec)
    if re.fullmatch(r"\w+", spec) and spec in _torchvision_names():
        return LoadedModel(_torchvision(spec), spec, f"torchvision:{spec}")
    raise ModelSpecError(f"cannot read model spec {spec!r}; write it as {FORMS}")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """ "1,3,224,224" -> [(1, 3, 224, 224)]; "1,4,16;1,2,8,8" -> two inputs. Else InputError."""
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in re.split(r"[,x]", part.strip())]
        if not part.strip() or not all(re.fullmatch(r"\d+", d) for d in dims):
            raise ShapeError(f"malformed --input-shape {text!r}; write positive integers "
                             f"separated by commas, e.g. 1,3,224,224 (';' between several inputs)")
        shape = tuple(int(d) for d in dims)
        if 0 in shape:
            raise ShapeError(f"--input-shape {text!r} has a zero dimension; every dimension must "
                             f"be at least 1, e.g. 1,3,224,224")
        if math.prod(shape) > _MAX_ELEMENTS:
            raise ShapeError(f"--input-shape {text!r} has {math.prod(shape):,} elements; "
                             f"pass a realistic example shape, e.g. 1,3,224,224")
        shapes.append(shape)
    return shapes


def make_inputs(shapes: list[tuple[int, ...]], seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal float32 tensors, one per shape."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def format_shapes(shapes: list[tuple[int, ...]]) -> str:
    return ";".join(",".join(str(d) for d in s) for s in shapes)


# ------------------------------------------------------------------------------------------
def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def _torchvision(name: str) -> nn.Module:
    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. resnet18, mobilenet_v2, vit_b_16"
        raise ModelSpecError(f"unknown torchvision model {name!r}; pass a name from "
                             f"torchvision.models.list_models(), {hint}")
    return torchvision_model(name, **_TORCHVISION_EXTRA.get(name, {}))


def torchvision_model(name: str, **kwargs) -> nn.Module:
    """`torchvision.models.get_model(name, weights=None, **kwargs)` in eval mode, with every
    all-zero weight matrix re-drawn from N(0, 0.02): torchvision zero-initialises some heads
    (ViT's, for one), which would make the output constant and any equivalence check vacuous.
    Builders with a backbone (segmentation, detection) get `weights_backbone=None` unless told
    otherwise: their default downloads ImageNet weights."""
    import inspect

    import torchvision

    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs.setdefault("weights_backbone", None)
    return redraw_zero_matrices(torchvision.models.get_model(name, weights=None, **kwargs).eval())


def redraw_zero_matrices(model: nn.Module) -> nn.Module:
    """Every all-zero weight matrix of `model` re-drawn from N(0, 0.02), in place; returns it.
    Zero-initialised heads (torchvision's ViT, many of timm's) make the output constant and any
    equivalence check vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist; check the path in {spec!r}")
    path = path.resolve()
    for module in list(sys.modules.values()):  # already imported (e.g. by the caller): reuse it
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module
    name = path.stem if path.stem not in sys.modules and path.stem.isidentifier() else \
        f"_passes_model_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined there stay picklable (torch.save) by this name
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raises is a bad spec
        del sys.modules[name]
        raise ModelSpecError(f"importing {str(path)!r} raised {type(e).__name__}: {first_line(e)}; "
                             f"fix the file so that `python {path.name}` runs") from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ModelSpecError(f"cannot import {name!r} for model spec {spec!r} ({first_line(e)}); "
                             f"install the package or give a file path: path/to/file.py:factory") from e
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"importing {name!r} raised {type(e).__name__}: {first_line(e)}; "
                             f"fix the module so that it imports") from e


def _call_factory(module, factory: str, spec: str) -> nn.Module:
    target = module
    for part in factory.split("."):
        if not hasattr(target, part):
            found = sorted(n for n, v in vars(module).items()
                           if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
            raise ModelSpecError(f"{module.__name__} has no factory {factory!r}; pass one of its "
                                 f"callables: {', '.join(found[:12]) or '(none defined)'}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"{factory!r} in {module.__name__} is a {type(target).__name__}, not "
                             f"a callable; pass a function or class that returns an nn.Module")
    try:
        model = target()
    except Exception as e:  # noqa: BLE001 - a factory that fails is a bad spec
        raise ModelSpecError(f"calling {factory}() from {spec!r} raised {type(e).__name__}: "
                             f"{first_line(e)}; the factory must build the model with no arguments") from e
    return _module(model, f"{factory}()").eval()


def _load_saved(path: Path, spec: str) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle and zip errors of every kind
        raise ModelSpecError(f"torch.load({str(path)!r}) raised {type(e).__name__}: {first_line(e)}; "
                             f"pass a whole model saved with torch.save(model, path)") from e
    if isinstance(obj, dict):
        raise ModelSpecError(f"{str(path)!r} holds a dict (a state_dict?), not a model; save the "
                             f"whole model with torch.save(model, path) or pass file.py:factory")
    return _module(obj, str(path)).eval()


def _module(obj, what: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(f"{what} gave a {type(obj).__name__}, not a torch.nn.Module; "
                             f"return the model itself")
    return obj


def _short(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name.split(".")[-1]) or "model"
