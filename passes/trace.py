"""Trace: nn.Module + example inputs -> torch.fx GraphModule with a shape on every tensor node.

`trace(model, example_inputs)` symbolically traces the model (torch.fx, with the tracer below:
passes' own replacement modules and functions stay opaque, nn.Transformer* layers are opened)
and runs a ShapeProp-style interpreter once on the example inputs, on meta tensors, so every
node carries `node.meta["tensor_meta"]` and the forward's MACs are counted. The model is traced
in eval mode and its training flags are restored afterwards; nothing else about it is touched.
A model fx cannot trace raises `TraceError` naming the user code line that failed and what to
do about it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import linecache
import operator
import os
import sys
import traceback
from dataclasses import dataclass, field
from types import FunctionType

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_trace
import torch.fx.graph as _fx_graph
from torch.fx import traceback as fx_traceback
from torch.fx.immutable_collections import immutable_dict
from torch.fx.node import map_aggregate, map_arg
from torch.fx.proxy import TraceError as FxTraceError
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.utils.stateless import _reparametrize_module

from .errors import InputError, TraceError, first_line
from .modules import SlimMultiheadAttention, module_attr
from .shapes import fast_meta, meta_like

_SUPPORTED_DTYPES = (torch.float32,)


@dataclass
class Traced:
    """The traced GraphModule, the inputs it was traced with, and its tables (each walked once
    here: the later stages read them instead of walking the module tree again; a rewrite points
    them at the pruned model's tensors and modules)."""

    gm: fx.GraphModule
    example_inputs: tuple
    macs: int = 0  # of the forward on example_inputs
    modules: dict = field(default_factory=dict)  # qualified name -> module, as gm.named_modules()
    params: dict = field(default_factory=dict)  # name -> parameter, as gm.named_parameters()
    buffers: dict = field(default_factory=dict)  # name -> buffer, as gm.named_buffers()
    # weights of the model's conv modules, by name: fx keeps a traced-through conv subclass (timm's
    # StdConv2d) as a plain Module holding the weight, so the module table cannot tell
    conv_weights: frozenset = frozenset()
    # the traced model, and whether its own forward computes the graph, as long as no node of
    # the graph changes: every parameter and buffer it holds is reached by the graph (no branch
    # the trace did not take reads one; a single number, such as the num_batches_tracked a
    # traced-through BatchNorm subclass counts in training, has nothing to prune and does not
    # count), no value the trace fixed is checked at run time (a branch on shapes: the graph
    # raises where forward would go another way), and no nn.Transformer* layer (traced through
    # with its fused fast path off) is in it
    model: torch.nn.Module | None = None
    own_forward: bool = False
    named: dict = field(default_factory=dict)  # the traced model's modules, as its named_modules()


def as_inputs(example_inputs) -> tuple:
    """A tensor or a tuple/list of tensors -> tuple; anything else is an InputError."""
    if isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        inputs = tuple(example_inputs)
    else:
        raise InputError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    for i, t in enumerate(inputs):  # a finite sum says all are finite (10x cheaper than isfinite)
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise InputError(f"example input {i} has {int((~torch.isfinite(t)).sum())} NaN/Inf values: "
                             f"equivalence checks need finite inputs")
    return inputs


def check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def call_whole(model: torch.nn.Module, example_inputs, modules=None):
    """`model` called as `part=` calls it: a tuple is its positional arguments, anything else its
    one argument; in eval mode, without grad. `modules`: all of model's modules, when known."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad(), eval_mode(model, modules):
        return model(*args)


def part_inputs(model: torch.nn.Module, part: str, example_inputs) -> tuple[torch.nn.Module, tuple]:
    """(the submodule, the inputs it receives) for `part=`: `model` runs once on
    `example_inputs` (a tuple is its positional arguments, anything else its one argument: a
    detector's `[image]`), in eval mode without grad, and a forward pre-hook keeps the tensors
    the submodule `part` receives on its first call (copies: what the model computed, as a
    detector's backbone receives the resized, normalised and padded batch)."""
    if not isinstance(part, str) or not part:
        raise InputError(f"part must be the qualified name of a submodule (as in named_modules()), got {part!r}")
    modules = dict(model.named_modules())
    sub = modules.get(part)
    if sub is None:
        import difflib

        close = difflib.get_close_matches(part, [n for n in modules if n], n=3)
        raise InputError(f"part {part!r}: {type(model).__name__} has no submodule of that name"
                         + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    seen: list = []
    handle = sub.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)) if not seen else None,
                                           with_kwargs=True)
    try:
        call_whole(model, example_inputs, modules.values())
    except Exception as e:  # noqa: BLE001 - whatever the model raises on these inputs
        raise InputError(f"{type(model).__name__} does not run on example_inputs ({type(e).__name__}: "
                         f"{first_line(e)}); with part=, example_inputs is what the "
                         f"whole model is called with: a tuple of its positional arguments, or its one "
                         f"argument (a detector: [image])") from e
    finally:
        handle.remove()
    if not seen:
        raise InputError(f"part {part!r} ({type(sub).__name__}) is not called when {type(model).__name__} "
                         f"runs on example_inputs")
    args, kwargs = seen[0]
    if kwargs or not args or not all(isinstance(t, torch.Tensor) for t in args):
        given = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
        raise InputError(f"part {part!r} ({type(sub).__name__}) is called with ({', '.join(given)}); "
                         f"a part passes prunes is called with tensors as positional arguments only")
    return sub, tuple(t.detach().clone() for t in args)


def check_dtypes(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse what the analysis cannot handle soundly: non-float32 weights. (NaN/Inf weights are
    refused by `passes.importance.scores`, whose norms read the weights anyway.)"""
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype not in _SUPPORTED_DTYPES:
            raise InputError(
                f"parameter '{name}' has dtype {t.dtype}; passes works on float32 models: "
                f"call model.float() first and convert the pruned model back afterwards")


def check_hooks(model: torch.nn.Module, modules: dict | None = None) -> None:
    """torch.fx traces `forward`, not `__call__`: hooks of traced-through modules would vanish,
    and hooks of leaf modules would change values the rules know nothing of. Refuse both.
    `modules`: the model's `dict(named_modules())` when the caller has it."""
    for name, m in (model.named_modules() if modules is None else modules.items()):
        hooks = [kind for kind in ("_forward_pre_hooks", "_forward_hooks") if getattr(m, kind, None)]
        if hooks:
            raise InputError(f"module '{name or type(model).__name__}' has {' and '.join(h.strip('_') for h in hooks)}; "
                             f"torch.fx would not keep them in the pruned graph: remove them before pruning "
                             f"and register them on the pruned model")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, modules=None):
    """Eval mode for the duration, with every submodule's training flag restored afterwards.
    `modules`: all of model's modules, when the caller has them."""
    flags = {m: m.training for m in (model.modules() if modules is None else modules)}
    if not any(flags.values()):  # already in eval mode: nothing to set or restore
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


_TRANSFORMERS = (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer,
                 torch.nn.TransformerDecoder, torch.nn.TransformerDecoderLayer)


class _Tracer(fx.Tracer):
    """torch.fx's default tracer, with these changes.

    - passes' own replacements are opaque nodes: the SlimMultiheadAttention module is a leaf and
      `passes.ops.window_attention(_3d)` are wrapped, so a pruned model traces like its original did
      and can be pruned again;
    - with `open_transformers`, nn.TransformerEncoder/Decoder and their layers are traced
      through (torch.nn modules are leaves by default, which left every channel of a model
      built from them pinned): their MultiheadAttention, Linear and LayerNorm submodules stay
      leaves with rules of their own. See `symbolic_trace` for what tracing them takes;
    - the module classes in `opaque` are leaves: submodules fx could not trace through (see
      `symbolic_trace`);
    - fx's trace steps run here for a module root (`_trace_module`), with the table of tensor
      attributes built faster; fx's own tracing code runs whenever one of its options that read
      node meta is on (`_fx_path`).
    """

    def __init__(self, open_transformers: bool = False, inputs: tuple | None = None,
                 opaque: frozenset = frozenset()):  # torch.load: no arguments
        from .ops import window_attention, window_attention_3d

        super().__init__(autowrap_functions=(window_attention, window_attention_3d))
        self.opaque = opaque
        self.open_transformers = open_transformers
        self.inputs = inputs  # example inputs: branches on shapes are taken as they go for these
        self._values: fx.Interpreter | None = None  # the graph built so far, run on the inputs
        self.checks = 0  # run-time checks of values the trace fixed (`_check`)
        self._leaves: dict[type, bool] = {}  # is_leaf_module per module class

    # -- branches on shapes ------------------------------------------------------------------
    # fx refuses a traced value in Python control flow (`if H != W:`, `int(n)`). With example
    # inputs, a value computed from tensor shapes alone (sizes, dims, numbers and arithmetic on
    # them, nothing read from tensor values) is computed instead: the graph built so far runs on
    # the inputs, the branch goes as it does for them, and a `torch._assert` node in the graph
    # checks at run time that the value is the same. Channel counts read by such a check are
    # pinned by the analysis (a count used as a number); an input that would take the other
    # branch gets an AssertionError naming the line, never a silently different model.
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self) if self.inputs is not None else fx.Proxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.inputs is None or not _from_shapes(obj.node):
            return super().to_bool(obj)  # fx's TraceError
        return self._concrete(obj, bool)

    def to_int(self, obj: fx.Proxy) -> int:
        if self.inputs is None or not _from_shapes(obj.node):
            raise FxTraceError("int() of a traced value that depends on tensor values, not only on their shapes")
        return self._concrete(obj, int)

    def iter(self, obj: fx.Proxy):
        """A loop over a tuple of sizes (`for s in x.shape[-2:]`): over its elements, symbolic,
        with its length checked."""
        if self.inputs is None or not _from_shapes(obj.node):
            return super().iter(obj)
        n = len(self._value(obj.node))
        self._check(self.create_proxy("call_function", len, (obj,), {}), n)
        return iter([obj[i] for i in range(n)])

    def _concrete(self, obj: fx.Proxy, kind: type):
        value = kind(self._value(obj.node))
        self._check(obj, value)
        return value

    def _check(self, obj: fx.Proxy, value) -> None:
        self.checks += 1
        shapes = ", ".join(str(tuple(t.shape)) for t in self.inputs)
        msg = (f"passes traced this model on inputs of shapes {shapes}, where {_user_line()} was "
               f"{value!r}; for these inputs it is not, and the traced graph has only the branch taken then")
        # a bool is tested as itself or negated (`obj == False` has no TorchScript op: the ONNX
        # exporter failed on it and fell back to one that bakes the batch size), a number by ==
        cond = obj if value is True else (self.create_proxy("call_function", operator.not_, (obj,), {})
                                          if value is False else obj == value)
        self.create_proxy("call_function", torch._assert, (cond, msg), {})

    def _value(self, node: fx.Node):
        """`node`'s value on the example inputs: the nodes added since the last call run first
        (with fx's patches of Module.__call__ and friends lifted, on copies of the inputs)."""
        from torch.fx._symbolic_trace import _maybe_revert_all_patches

        if self._values is None:
            self._values = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
            self._values.args_iter = iter([t.clone() for t in self.inputs])
        run = self._values
        with _maybe_revert_all_patches(), torch.no_grad():
            for n in self.graph.nodes:
                if n not in run.env:
                    run.env[n] = run.run_node(n)
        return run.env[node]

    def trace(self, root, concrete_args=None):
        """fx's trace. A wrapped torch function in the code traced (`_assert_is_none`, which fx
        puts in a graph for a parameter fixed to None, when a pruned GraphModule is traced
        again: pruned again, or rebuilt by torch.load) loses the node flag that makes fx's code
        generation emit `wrap("torch.fx._symbolic_trace._assert_is_none")` into the module it
        compiles: torch 2.14 registers that dotted name against the compiled module's globals,
        where it is missing, and every later trace in the process failed with a KeyError. The
        function is registered for wrapping by its own module, so tracing the generated code
        keeps it a leaf without the flag."""
        with _traceable_builtins(self):
            if isinstance(root, torch.nn.Module) and not self._fx_path():
                graph = self._trace_module(root, concrete_args)
            else:
                graph = super().trace(root, concrete_args)
        for n in graph.nodes:
            if n.meta.get("is_wrapped") and f"{getattr(n.target, '__module__', '')}.".startswith("torch."):
                del n.meta["is_wrapped"]
        return graph

    def _trace_module(self, root: torch.nn.Module, concrete_args) -> fx.Graph:
        """torch 2.14's `Tracer.trace` for a module, step for step, but for the table of tensor
        attributes (`tensor_attrs`, where `create_arg` finds a tensor constant's attribute
        name): fx tests every attribute of every module with an `isinstance` against four
        types, 280 ns each (resnet50: 3,474 attributes, 1.1 ms), where `_tensor_attrs` skips
        the values of plain builtin types by their exact type first. Same table, same order;
        a test compares the graphs with fx's own tracer's."""
        from torch.fx._lazy_graph_module import _LazyGraphModule

        old_flag = _fx_trace._get_is_fx_tracing()
        _fx_trace._set_is_fx_tracing(True)
        try:
            _LazyGraphModule.force_recompile(root)
            self.root = root
            if not hasattr(type(root), self.traced_func_name):
                raise AssertionError(f"traced_func_name={self.traced_func_name} doesn't exist in {type(root).__name__}")
            fn = getattr(type(root), self.traced_func_name)
            self.root_module_name = root._get_name()
            self.submodule_paths = {mod: name for name, mod in root.named_modules()}
            self.graph = fx.Graph(tracer_cls=getattr(self, "__class__", None))
            if hasattr(fn, "__code__"):
                code = fn.__code__
                self.graph._co_fields = {"co_name": code.co_name, "co_filename": code.co_filename,
                                         "co_firstlineno": code.co_firstlineno}
            self.tensor_attrs = _tensor_attrs(root)
            if not isinstance(fn, FunctionType):
                raise AssertionError(f"Expected FunctionType, got {type(fn)}")
            fn_globals = fn.__globals__  # read before it is patched
            fn, args = self.create_args_for_root(fn, True, concrete_args)
            parameter_proxy_cache: dict[str, fx.Proxy] = {}  # one get_attr per parameter
            orig_getattr, orig_call = _fx_trace._orig_module_getattr, _fx_trace._orig_module_call

            @functools.wraps(orig_getattr)
            def module_getattr_wrapper(mod, attr):
                return self.getattr(attr, orig_getattr(mod, attr), parameter_proxy_cache)

            @functools.wraps(orig_call)
            def module_call_wrapper(mod, *args, **kwargs):
                def forward(*args, **kwargs):
                    return orig_call(mod, *args, **kwargs)

                _fx_trace._autowrap_check(patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}),
                                          self._autowrap_function_ids)
                return self.call_module(mod, forward, args, kwargs)

            with _fx_trace._new_patcher() as patcher:
                patcher.patch_method(torch.nn.Module, "__getattr__", module_getattr_wrapper, deduplicate=False)
                patcher.patch_method(torch.nn.Module, "__call__", module_call_wrapper, deduplicate=False)
                _fx_trace._patch_wrapped_functions(patcher)
                _fx_trace._autowrap_check(patcher, fn_globals, self._autowrap_function_ids)
                for module in self._autowrap_search:
                    _fx_trace._autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)
                ann = inspect.get_annotations(inspect.unwrap(fn))
                self.create_node("output", "output", (self.create_arg(fn(*args)),), {},
                                 type_expr=ann.get("return", None))
            self.submodule_paths = None
        except RuntimeError as e:
            if e.args and isinstance(e.args[0], str) and "data-dependent" in e.args[0]:
                e.partial_fx_graph = self.graph.python_code(root_module="self", verbose=True).src
            raise
        finally:
            _fx_trace._set_is_fx_tracing(old_flag)
        return self.graph

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        """Decided by the module's class alone (as fx's own rule: its `__module__`), once per class."""
        kind = type(m)
        leaf = self._leaves.get(kind)
        if leaf is None:
            if self.open_transformers and kind in _TRANSFORMERS:
                leaf = False
            else:
                leaf = isinstance(m, SlimMultiheadAttention) or kind in self.opaque or super().is_leaf_module(m, qualname)
            self._leaves[kind] = leaf
        return leaf

    # The overrides below only skip work for the commonest cases; the graph they build is
    # fx's own (tests/test_core.py compares the two on every test structure and two models).
    def create_arg(self, a):
        """fx's Tracer.create_arg tests a value against parameters, tensors, modules, named
        tuples and constant types before reaching the case of a Proxy or a Python number:
        those, plain tuples of them and empty kwargs take the short way."""
        kind = type(a)
        if kind is fx.Proxy or kind is _ShapeProxy:
            return a.node
        if kind in _PLAIN:
            return a
        if kind is tuple:
            return tuple([self.create_arg(x) for x in a])
        if kind is dict and not a:  # the kwargs of most calls
            return {}
        return super().create_arg(a)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """fx's turns a parameter (or, if asked, a buffer) read as a module attribute into a
        proxy; every other value (a submodule, a number) is returned as it is, here at once."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def path_of_module(self, mod: torch.nn.Module) -> str:
        path = self.submodule_paths.get(mod) if self.submodule_paths else None
        return path if type(path) is str else super().path_of_module(mod)  # fx's raises NameError

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """As fx's, without the copy of the module call stack it puts in every node's meta
        (`nn_module_stack`, which nothing here reads) and without the scope record per node
        (`node_name_to_scope`, read by nothing here either)."""
        if self._fx_path():
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        return _append_node(self.graph, kind, target, args, kwargs, name, type_expr)

    def call_module(self, m, forward, args, kwargs):
        """As fx's, without the bookkeeping of module scopes and the call stack (a copy of the
        scope and two ordered-dict updates per module call) that only the node meta above used."""
        if self._fx_path():
            return super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):
            return forward(*args, **kwargs)
        return self.create_proxy("call_module", path, args, kwargs)

    def _fx_path(self) -> bool:
        """fx's own path is kept whenever one of its options that read the scope or the node meta
        (stack traces, preserved node meta, mutation checks) is on."""
        return self.check_mutable_operations or self.record_stack_traces or fx_traceback.has_preserved_node_meta()


_NOT_CONSTANTS = frozenset({bool, int, float, str, bytes, type(None), tuple, list, dict, set, frozenset,
                            collections.OrderedDict, type})  # exact types: never a tensor attribute


def _tensor_attrs(root: torch.nn.Module) -> dict:
    """fx's `tensor_attrs` of `root`: every module attribute (in `__dict__`) holding a tensor,
    script object or pytree spec, by value, its qualified name the last path fx's own walk
    gives it (a module reached twice is walked twice, as fx does)."""
    found: dict = {}
    kinds = _fx_trace._constant_attribute_types

    def walk(m: torch.nn.Module, prefix: str) -> None:
        for k, v in m.__dict__.items():
            if type(v) not in _NOT_CONSTANTS and isinstance(v, kinds):
                found[v] = prefix + k
        seen: set = set()  # as named_children: a child held twice by one module is walked once
        for k, child in m._modules.items():
            if child is not None and child not in seen:
                seen.add(child)
                walk(child, f"{prefix}{k}.")

    walk(root, "")
    return found


class _ShapeProxy(fx.Proxy):
    """A Proxy that `int()` turns into a Python int when it is computed from shapes
    (`_Tracer.to_int`). Only `int()`: `__index__` would also be taken by torch's argument
    parser (`torch.zeros(B, N)` with traced sizes), which fx records symbolically without it."""

    def __int__(self) -> int:
        return self.tracer.to_int(self)


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype"})  # dtype: fixed in a float32 model (checked)


def _from_shapes(node: fx.Node) -> bool:
    """`node`'s value is computed from tensor shapes (and dtypes), constants and arithmetic
    alone (operator and math functions), never from tensor values."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_method" and n.target in _SHAPE_METHODS or n.op == "call_function" and (
                n.target is len or n.target is getattr and n.args[1:2] and n.args[1] in _SHAPE_ATTRS):
            continue  # a shape read: its tensor's values do not matter
        if n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "math"):
            stack.extend(n.all_input_nodes)
            continue
        return False
    return True


def _in_library(filename: str) -> bool:
    """A frame of torch's or passes' own code, not of the model being traced."""
    return "/torch/" in filename or "/passes/" in filename


def _user_line() -> str:
    """file:line `code` of the innermost frame outside torch and passes: the branch being traced."""
    f = sys._getframe(1)
    while f is not None and _in_library(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return "a branch on shapes"
    line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} `{line}`"


_CANDIDATES: dict[str, str] = {}  # a string target -> the name fx makes of it before numbering


def _candidate(g: fx.Graph, target) -> str:
    """fx's name for a node of `target` before the namespace numbers it: `Graph._target_to_str`
    (snake case), then what `_Namespace.create_name` does to a string that is not an identifier
    (characters other than letters, digits and `_` become `_`, a leading digit gets a `_`).
    Both depend on the target alone: a string target's (a module path, a method or attribute
    name) is made once per process (resnet50's trace stage 12.1 -> 11.3 ms in interleaved
    pairs: a sampling profile had put a tenth of it in these regular expressions); a
    function's, a short identifier already, is made each time (a table of functions would keep
    them, and what they hold, alive). The namespace still numbers every name; a test compares
    the names with fx's own tracer's."""
    if type(target) is str and (found := _CANDIDATES.get(target)) is not None:
        return found
    name = g._target_to_str(target)
    if _fx_graph._name_regex.match(name) is None:
        name = _fx_graph._illegal_char_regex.sub("_", name) or "_unnamed"
        if name[0].isdigit():
            name = f"_{name}"
    if type(target) is str and len(_CANDIDATES) < 65536:  # bounded: a process tracing many models
        _CANDIDATES[target] = name
    return name


def _append_node(g: fx.Graph, op, target, args, kwargs, name, type_expr) -> fx.Node:
    """What fx's Graph.create_node does while tracing (torch 2.14: name the node, make it, register
    the name, insert it at the end, index it), less its scan of every argument for raw
    SymInt/SymFloat/SymBool values, which only a trace with symbolic shapes can hold (a tenth of
    resnet50's trace); the graph has no owning module yet, so no creation hooks run."""
    if g.owning_module is not None:
        return g.create_node(op, target, args, kwargs, name, type_expr)
    name = g._graph_namespace.create_name(name if name is not None else _candidate(g, target), None)
    node = fx.Node(g, name, op, target, args or (), kwargs or immutable_dict(), type_expr)
    g._graph_namespace.associate_name_with_obj(name, node)
    g._insert(node)
    g._find_nodes_lookup_table.insert(node)
    g._len += 1
    return node


_PLAIN = (int, float, bool, str, type(None))
_FROM_DATA = ("tensor", "as_tensor", "scalar_tensor")  # torch.<name>(data, ...)
_FROM_SIZES = ("ones", "zeros", "empty", "rand", "randn")  # torch.<name>(*size, ...)


def _has_proxy(v) -> bool:
    if isinstance(v, fx.Proxy):
        return True
    return isinstance(v, (list, tuple)) and any(_has_proxy(x) for x in v)


@contextlib.contextmanager
def _traceable_builtins(tracer: fx.Tracer):
    """Two kinds of torch function that fx cannot record when given traced values, while the
    trace runs: `torch.tensor(n)` of a traced number (RAFT divides by
    `torch.sqrt(torch.tensor(num_channels))`) reads it as an array and fails, so a call given
    traced data becomes a graph node of the function itself; `torch.ones(B, N)` with traced
    sizes fails torch's argument parser (as varargs), so the sizes are passed as one tuple
    (`torch.ones((B, N))`, which fx records). Calls without traced values go straight through;
    the graph names the original functions, so the rules see `torch.tensor`, `torch.ones`."""
    originals = {name: getattr(torch, name) for name in _FROM_DATA + _FROM_SIZES}

    def from_data(f):
        def call(data, *args, **kwargs):
            if _has_proxy(data):
                return tracer.create_proxy("call_function", f, (data, *args), kwargs)
            return f(data, *args, **kwargs)
        return call

    def from_sizes(f):
        def call(*size, **kwargs):
            if len(size) > 1 and any(isinstance(s, fx.Proxy) for s in size):
                return f(tuple(size), **kwargs)
            return f(*size, **kwargs)
        return call

    for name in _FROM_DATA:
        setattr(torch, name, from_data(originals[name]))
    for name in _FROM_SIZES:
        setattr(torch, name, from_sizes(originals[name]))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(torch, name, f)


@contextlib.contextmanager
def _traceable_transformers():
    """nn.Transformer* forwards choose a fused fast path from tensor properties, and call
    `_get_seq_len(src)`, which tests `src.is_nested` and `len(src.size())`: neither traces. With
    the MHA fast path off the choice is made without looking at tensors (the traced graph then
    holds the plain path, which computes the same function), and `_get_seq_len` only feeds causal
    mask detection, which does not read it when no mask is given (a mask given as a traced value
    fails to trace anyway, and the modules are then kept as leaves)."""
    import torch.nn.modules.transformer as tx

    from .count import unfused_attention

    original = tx._get_seq_len
    tx._get_seq_len = lambda src, batch_first: None
    try:
        with unfused_attention():
            yield
    finally:
        tx._get_seq_len = original


OPAQUE = "passes.opaque"  # GraphModule.meta key: {module class name: why fx could not trace it}
CHECKS = "passes.checks"  # GraphModule.meta key: how many values the trace fixed checks at run time
_MAX_OPAQUE = 16  # module classes made opaque before a trace failure is reported as it is


def symbolic_trace(model: torch.nn.Module, concrete: dict | None = None, modules=None,
                   inputs: tuple | None = None) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with passes' tracer. nn.Transformer* modules are traced through;
    if that fails (masks passed as traced values), they are traced again as leaves. `concrete`:
    forward's parameters fixed to a value (`default_args`); `modules`: all of model's modules,
    when the caller has them; `inputs`: example inputs, with which branches on tensor shapes
    trace (as they go for these inputs, checked at run time: see `_Tracer.to_bool`).

    A submodule fx cannot trace through (a branch on tensor values, a write to a traced tensor,
    an attribute set in forward, a builtin given traced values: timm's GPSA, LiteMLA) does not
    fail the model: the trace starts again with that module's class a leaf, one opaque node
    that runs the module's own forward, whose channels the analysis pins (it has no rule). The
    class is the innermost one whose own code (not torch's) was running when the trace failed;
    the model's own forward is never made opaque, its failure is the error. The classes and
    the trace errors that made them opaque are in `gm.meta[OPAQUE]`."""
    concrete = concrete or {}
    modules = list(model.modules() if modules is None else modules)
    opaque: dict[type, str] = {}
    while True:
        try:
            gm = _trace_once(model, concrete, modules, inputs, frozenset(opaque))
        except Exception as e:
            cls = _failing_class(e, model, modules)
            if cls is None or cls in opaque or len(opaque) >= _MAX_OPAQUE:
                raise
            opaque[cls] = f"{type(e).__name__}: {first_line(e)}"[:300]
            continue
        if opaque:
            gm.meta[OPAQUE] = {f"{c.__module__}.{c.__qualname__}": why for c, why in opaque.items()}
        return gm


def _trace_once(model, concrete, modules, inputs, opaque: frozenset) -> fx.GraphModule:
    if any(type(m) in _TRANSFORMERS for m in modules):
        try:
            with _traceable_transformers():
                return _trace_with(_Tracer(open_transformers=True, inputs=inputs, opaque=opaque), model, concrete)
        except Exception:
            pass  # the leaf trace below gives the error worth reporting, if any
    return _trace_with(_Tracer(inputs=inputs, opaque=opaque), model, concrete)


def _failing_class(e: BaseException, model: torch.nn.Module, modules: list) -> type | None:
    """The class of the innermost submodule of `model` (not `model` itself) whose own code was
    running when `e` was raised during a trace, or None."""
    ids = {id(m) for m in modules if m is not model}
    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        if _in_library(frame.f_code.co_filename):
            continue
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in ids:
            found = type(owner)
    return found


def default_args(model: torch.nn.Module, n_inputs: int) -> dict:
    """forward's parameters after the first `n_inputs` that have a default of None, a bool, a
    number or a string: traced with that value (fx's concrete_args), as the model runs when
    called with the example inputs alone. timm's ViT, `forward(x, attn_mask=None,
    is_causal=False)`, branches on both; fx keeps a placeholder for each, with its default, and
    an assertion that it is not given another value."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {}
    for i, p in enumerate(params):
        if i >= n_inputs and p.kind in kinds and p.default is not inspect.Parameter.empty \
                and (p.default is None or type(p.default) in (bool, int, float, str)):
            out[p.name] = p.default
    return out


def _trace_with(tracer: fx.Tracer, model: torch.nn.Module, concrete: dict) -> fx.GraphModule:
    """The traced GraphModule, its Python code generated on first use (torch.fx's own
    _LazyGraphModule): analysis only reads the graph, and the pruned model becomes a plain
    GraphModule after the rewrite (`passes.rewrite.apply`), so code generated here was thrown
    away (about 6 ms of resnet50's 25 ms trace)."""
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = graph_module(tracer.root, graph, type(model).__name__)
    if getattr(tracer, "checks", 0):
        gm.meta[CHECKS] = tracer.checks
    return gm


def graph_module(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """torch.fx's `_LazyGraphModule(root, graph, class_name)`, built faster: fx copies every module
    and tensor the graph names into a new tree with generic getattr/setattr and a caught
    AttributeError per container it has not made yet (resnet50: 1.7 ms, here 1.0 ms). The tree
    here is the same (plain nn.Module containers, the same leaf modules and tensors, buffers
    registered as buffers), with the containers' module tables written directly; fx's own
    construction is used whenever global module registration hooks would see those writes."""
    from torch.fx._lazy_graph_module import _LazyGraphModule
    from torch.nn.modules.module import _global_module_registration_hooks

    if _global_module_registration_hooks:
        return _LazyGraphModule(root, graph, class_name)
    gm = _LazyGraphModule(root, fx.Graph(), class_name)  # an empty graph: nothing copied yet
    for node in graph.nodes:
        if node.op == "call_module" or node.op == "get_attr":
            _copy_attr(root, gm, node.target)
    gm.graph = graph
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:  # as GraphModule.__init__
        gm._tracer_cls = graph._tracer_cls
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras
    return gm


def _holds(m: torch.nn.Module, name: str) -> bool:
    """`name` is a plain attribute, parameter or buffer of `m`."""
    return name in vars(m) or name in m._parameters or name in m._buffers


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    """torch.fx.graph_module._copy_attr: install `src.<target>` at `dst.<target>`, making plain
    containers on the way; nothing to do under a module already installed whole."""
    *prefix, leaf = target.split(".")
    for item in prefix:
        s = module_attr(src, item)
        d = dst._modules.get(item)
        if d is None and _holds(dst, item):
            d = getattr(dst, item)
        if s is d:
            return
        if d is None:
            d = dst._modules[item] = torch.nn.Module()
        src, dst = s, d
    value = module_attr(src, leaf)
    if isinstance(value, torch.nn.Module) and not _holds(dst, leaf):  # what setattr does then
        dst._modules[leaf] = value
    elif isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        dst.register_buffer(leaf, value, persistent=leaf not in src._non_persistent_buffers_set)
    else:
        setattr(dst, leaf, value)


def trace(model: torch.nn.Module, example_inputs, named: dict | None = None) -> Traced:
    """`named`: the model's `dict(named_modules())`, when the caller has it."""
    inputs = as_inputs(example_inputs)
    source = dict(model.named_modules()) if named is None else named
    check_hooks(model, source)
    fixed = default_args(model, len(inputs))
    try:
        # `if self.training:` branches: the inference graph is the one pruned
        with eval_mode(model, source.values()):
            gm = symbolic_trace(model, fixed, source.values(), inputs)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
        raise TraceError(_trace_message(model, e)) from e
    # parameters fixed to their defaults keep a placeholder (with the default) each
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder") - len(fixed)
    if n_placeholders != len(inputs):
        raise InputError(
            f"{type(model).__name__}.forward takes {n_placeholders} inputs, example_inputs has {len(inputs)}")
    modules = dict(gm.named_modules())
    params, buffers = _tensors(modules)
    check_dtypes(params)
    check_dtypes(buffers)
    for i, t in enumerate(inputs):
        if t.is_floating_point() and t.dtype not in _SUPPORTED_DTYPES:
            raise InputError(f"example input {i} is {t.dtype}; the model is float32: pass float32 inputs")
    # fx rebuilds containers: they take the caller's flags (then an eval-mode model needs no
    # mode switch in the shape pass)
    copy_training_flags(source, modules)
    conv_weights = frozenset(f"{n}.weight" if n else "weight" for n, m in source.items()
                             if isinstance(m, torch.nn.modules.conv._ConvNd))
    try:
        macs = propagate_shapes(gm, inputs, modules=modules)
    except NodeFailure as e:
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise InputError(f"the model does not run on example inputs [{shapes}]: {e}") from e.error
    reached = {id(t) for table in (params, buffers) for t in table.values()}
    own = CHECKS not in gm.meta and not any(type(m) in _TRANSFORMERS for m in source.values()) and all(
        t is None or id(t) in reached or t.numel() <= 1 for m in source.values()
        for store in (m._parameters, m._buffers) for t in store.values())
    return Traced(gm, inputs, macs, modules, params, buffers, conv_weights, model, own, source)


def _tensors(modules: dict[str, torch.nn.Module]) -> tuple[dict, dict]:
    """(parameters, buffers) by name, as named_parameters()/named_buffers() list them (each
    tensor once, under its first name), read from the module table in one loop."""
    tables: tuple[dict, dict] = ({}, {})
    seen: tuple[set, set] = (set(), set())
    for prefix, m in modules.items():
        for table, ids, store in zip(tables, seen, (m._parameters, m._buffers)):
            for k, t in store.items():
                if t is not None and id(t) not in ids:
                    ids.add(id(t))
                    table[f"{prefix}.{k}" if prefix else k] = t
    return tables


def copy_training_flags(src: dict[str, torch.nn.Module], dst: dict[str, torch.nn.Module]) -> None:
    """Each module of `dst` takes the training flag of the module of `src` with the same
    qualified name (fx builds fresh container modules, which start in training mode)."""
    for name, m in dst.items():
        s = src.get(name)
        if s is not None and m.training != s.training:
            m.training = s.training


def propagate_shapes(gm: fx.GraphModule, inputs: tuple, *, fast: bool = True, modules: dict | None = None) -> int:
    """tensor_meta on every node, in eval mode; returns the MACs of that forward.

    Runs on meta tensors first (nothing computed), then, if an op needs real values, on real
    tensors. Measured here on resnet50, densenet201, vit_b_16, swin_t: meta 1.4-7x faster,
    identical MACs (FakeTensorMode was slower than real tensors on CNNs). MACs are counted in
    the same pass (`passes.count`): counting costs no extra forward. With `fast`, the commonest
    ops (layers, norms, activations, pooling, views, cat, arithmetic, attention: the list is in
    `passes.shapes.fast_meta`) take their shape and MACs from a formula instead of running
    torch's meta kernels.
    `modules`: gm's `dict(named_modules())` when the caller has it."""
    from .count import unfused_attention

    modules = dict(gm.named_modules()) if modules is None else modules
    with eval_mode(gm, modules.values()), torch.no_grad(), unfused_attention():
        try:
            return _run(gm, inputs, modules, meta=True, fast=fast)
        except NodeFailure:
            pass
        return _run(gm, inputs, modules, meta=False, fast=False)


def _run(gm: fx.GraphModule, inputs: tuple, modules: dict, *, meta: bool, fast: bool) -> int:
    """What torch.fx's ShapeProp does (an Interpreter run recording `tensor_meta` per node), as
    one loop: a failure names the node (`NodeFailure`) and keeps torch's message, nothing is
    printed, MACs are counted per node (formula nodes skip the counter's dispatch).

    On meta tensors, graph inputs and get_attr tensors become meta copies, and a leaf module
    that runs (no formula) sees meta copies of its own parameters and buffers for that call:
    only those modules pay for swapping tensors. List arguments are fresh lists, as in the
    generated code (some functions mutate them: torchvision's video Swin)."""
    from .count import macs_of, new_counter

    convert = meta_like if meta else (lambda t: t)
    counter, macs = new_counter(), 0
    env: dict[fx.Node, object] = {}
    last_use = {} if meta else _last_uses(gm.graph)  # real tensors: free values after their last use
    feed = iter(inputs)
    for n in gm.graph.nodes:
        op = n.op
        try:
            if op == "placeholder":  # past the inputs: a parameter fixed to its default
                result = next(feed, n)
                result = convert(result) if result is not n else n.args[0]
            elif op == "get_attr":
                result = gm
                for part in n.target.split("."):
                    result = getattr(result, part)
                if isinstance(result, torch.Tensor):
                    result = convert(result)
            elif op == "output":
                result = map_arg(n.args[0], env.__getitem__)
            else:
                args = _fetch(n.args, env)
                if args is None:
                    args = _thaw(map_arg(n.args, env.__getitem__))
                kwargs = _thaw(dict(map_arg(n.kwargs, env.__getitem__))) if n.kwargs else {}
                module = modules[n.target] if op == "call_module" else None
                hit = fast_meta(op, n.target, module, args, kwargs) if fast else None
                if hit is not None:
                    result, node_macs = hit
                else:
                    with counter as fc:
                        result = _call(op, n.target, module, args, kwargs, meta)
                    node_macs = macs_of(fc)
                macs += node_macs
        except NodeFailure:
            raise
        except Exception as e:
            raise NodeFailure(n, e) from e
        env[n] = result
        _record(n, result)
        for done in last_use.get(n, ()):
            del env[done]
    return macs


def _fetch(args: tuple, env: dict):
    """The node's argument values when they are nodes and plain numbers (the common case), or
    None: then fx's map_arg builds them (nested lists, slices, ...)."""
    out = []
    for a in args:
        kind = type(a)
        if kind is fx.Node:
            out.append(env[a])
        elif kind in _PLAIN:
            out.append(a)
        else:
            return None
    return tuple(out)


def _call(op: str, target, module, args, kwargs, meta: bool):
    if op == "call_function":
        return target(*args, **kwargs)
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    state = {k: meta_like(t) for k, t in [*module.named_parameters(), *module.named_buffers()]} if meta else {}
    if not state:
        return module(*args, **kwargs)
    with _reparametrize_module(module, state):
        return module(*args, **kwargs)


def _last_uses(graph: fx.Graph) -> dict:
    """Per node: the values whose last use it is (the Interpreter's garbage collection)."""
    seen, out = set(), {}
    for n in reversed(graph.nodes):
        for used in n.all_input_nodes:
            if used not in seen:
                seen.add(used)
                out.setdefault(n, []).append(used)
    return out


def _record(n: fx.Node, result) -> None:
    if isinstance(result, torch.Tensor):
        n.meta["tensor_meta"] = tensor_metadata(result)
    elif isinstance(result, (tuple, list, dict)):
        found = []
        meta = map_aggregate(result, lambda o: found.append(1) or tensor_metadata(o)
                             if isinstance(o, torch.Tensor) else o)
        if found:
            n.meta["tensor_meta"] = meta


class FreshArgs:
    """Interpreter mixin. fx hands nodes immutable lists; the generated code builds fresh ones,
    and some functions mutate their list arguments (torchvision's video Swin): so do we."""

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _thaw(args), _thaw(kwargs)


class NodeFailure(Exception):
    """A node raised while the graph ran: which node, and torch's own exception."""

    def __init__(self, node: fx.Node, error: Exception):
        self.node, self.error = node, error
        first = first_line(error)
        super().__init__(f"node '{node.name}' ({_target(node)}) raised {type(error).__name__}: {first}")


def _target(node: fx.Node) -> str:
    from .channels import describe_target
    return describe_target(node)


_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor):
    """ShapeProp's TensorMetadata of `t`. torch's extractor finds the memory format with Python
    reference checks (a quarter of resnet50's meta shape pass); for a dense, unquantised tensor
    the tensor's own C++ `is_contiguous(memory_format=...)` answers the same question."""
    if t.is_quantized or t.layout != torch.strided:
        return _extract_tensor_metadata(t)
    fmt = None
    for f in _FORMATS:
        if t.is_contiguous(memory_format=f):
            fmt = f
            break
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _thaw(v):
    if isinstance(v, (list, tuple)) and type(v).__name__ in ("immutable_list", "immutable_dict"):
        return [_thaw(x) for x in v]
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_thaw(x) for x in v)
    if isinstance(v, list):
        return [_thaw(x) for x in v]
    if isinstance(v, dict):
        return {k: _thaw(x) for k, x in v.items()}
    return v


def _trace_message(model: torch.nn.Module, e: Exception) -> str:
    """Name the innermost frame of user code (not torch's) and say what to do."""
    where = ""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if not _in_library(fr.filename):
            where = f" at {fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`"
            break
    first = first_line(e)
    hint = ("the forward uses a traced value in Python control flow or a Python builtin; "
            "make that branch independent of tensor values, or move it into a submodule (a "
            "submodule fx cannot trace is kept whole, as one opaque node whose channels are pinned)")
    part = next((n for n in _PARTS if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    if part:  # detection models: the loop over images is outside the backbone
        hint += (f"; or prune a part that traces on its own: passes.prune(model, <what the model is "
                 f"called with, [image] for a detector>, part={part!r}) (the part's outputs are never "
                 f"pruned, so the rest of the model receives the widths it expects)")
    return f"torch.fx cannot trace {type(model).__name__}{where}: {type(e).__name__}: {first}. Fix: {hint}"


_PARTS = ("backbone", "encoder", "features", "body", "trunk")
