"""What a model computes, read from its structure: is `model(x)` exactly a chain of known layers?

The fast kernels (`functional.fused_block`, `functional.norm_relu_pool`, `functional.task_batched`)
compute conv -> BatchNorm -> ReLU -> max-pool stacks their own way. They may run a model only when
its `forward` is *proven* to be such a stack, whatever its class: a `fastadapt.nn.Conv4`, a user's
`nn.Sequential` of the same layers, or a user class whose `forward` calls them one after another.
`layer_chain(model)` traces the forward with `torch.fx` and accepts it only when the traced graph is
a single chain from the input to the output made of

- calls of modules of exactly these types (not subclasses): `Conv2d`, `BatchNorm2d` with batch
  statistics (no running-statistics buffers), `ReLU`, `MaxPool2d`, `Flatten`, `Linear`;
- `torch.flatten(x, 1)`, `x.flatten(1)`, `x.view(x.size(0), -1)` / `x.reshape(x.shape[0], -1)`
  (as `nn.Flatten()`), and `F.relu(x)`, `torch.relu(x)`, `x.relu()` (as `nn.ReLU()`).

Anything else (an arithmetic op, a residual connection, a subclass overriding `forward`, a module
hook, data-dependent control flow that fx cannot trace) gives None: the caller then runs the
module's own `forward` through `torch.func.functional_call`, which is exact by definition.

The answer is cached per model under a signature of everything it depends on that Python can see
cheaply: every submodule's identity, class (and the class's `forward`), an instance `forward`
override, public scalar attributes (stride, eps, flags a `forward` may branch on), parameter and
buffer names (and whether a buffer is None), and hook counts. A model edited after a learner was
built (a layer replaced, a hook added, a stride changed) is traced again on its next call. (State
the signature cannot see, such as a global variable read by `forward`, is not tracked.)

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
    ...                     nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    >>> [name for name, _ in layer_chain(net)]
    ['0', '1', '2', '3', '4', '5']
    >>> class Scaled(nn.Sequential):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> layer_chain(Scaled(*net)) is None
    True
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

__all__ = ["Chain", "layer_chain", "fixed_structure", "batch_norm_with_batch_statistics"]

# (qualified module name, module) in call order; function forms appear as fresh modules named "".
Chain = tuple[tuple[str, nn.Module], ...]

_LAYER_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear)
_RELU_FUNCTIONS = (F.relu, torch.relu)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# attribute types keyed on by value (tuples: of scalars, as layer hyperparameters are)
_KEYED = frozenset({bool, int, float, str, tuple, type(None)})
_CACHE_ENTRIES = 4

_cache: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Chain | None]]" = weakref.WeakKeyDictionary()
_last: "weakref.WeakKeyDictionary[nn.Module, Chain | None]" = weakref.WeakKeyDictionary()
_trace_lock = threading.Lock()  # fx patches nn.Module.__call__ while it traces
_fixed: ContextVar[dict[int, Chain | None] | None] = ContextVar("fastadapt_fixed_structure", default=None)


def layer_chain(model: nn.Module) -> Chain | None:
    """The layers `model(x)` applies one after another, if its traced forward is exactly such a
    chain of known layers (see the module docstring); None otherwise.

    Each call checks the model's signature (~0.1 ms); within `fixed_structure(model)` the answer
    is read once for the whole block.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> chain = layer_chain(Conv4.omniglot(ways=5))
        >>> chain[0][0], chain[-1][0], len(chain)
        ('features.0', 'head', 18)
    """
    if torch.compiler.is_compiling():  # (Dynamo cannot trace the signature): the eager answer
        return _last.get(model)
    fixed = _fixed.get()
    if fixed is not None and id(model) in fixed:
        return fixed[id(model)]
    if any(getattr(module_globals, name, None) for name in _GLOBAL_HOOKS):
        return None
    key = _signature(model)
    entries = _cache.setdefault(model, {})
    if key not in entries:
        with _trace_lock:
            chain = _trace_chain(model)
        if len(entries) >= _CACHE_ENTRIES:
            entries.pop(next(iter(entries)))
        entries[key] = chain
    _last[model] = entries[key]
    return entries[key]


@contextlib.contextmanager
def fixed_structure(*models: nn.Module) -> Iterator[None]:
    """Within the block each model's structure is read once, at entry: a meta-batch's hundreds of
    forwards skip the signature check. Editing a model inside the block is not seen (do not).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> with fixed_structure(model):
        ...     len(layer_chain(model))
        18
    """
    outer = _fixed.get() or {}
    token = _fixed.set({**outer, **{id(m): layer_chain(m) for m in models}})
    try:
        yield
    finally:
        _fixed.reset(token)


def batch_norm_with_batch_statistics(m: nn.Module) -> bool:
    """True for an affine `nn.BatchNorm2d` (exactly) that always normalises with the batch's own
    statistics: no running-statistics buffers, in train and eval mode alike.

    Example:
        >>> batch_norm_with_batch_statistics(nn.BatchNorm2d(3, track_running_stats=False))
        True
        >>> batch_norm_with_batch_statistics(nn.BatchNorm2d(3))
        False
    """
    return type(m) is nn.BatchNorm2d and m.affine and m.running_mean is None and m.running_var is None


def _signature(model: nn.Module) -> tuple:
    """Everything about `model` that `_trace_chain`'s answer depends on and Python sees cheaply."""
    return tuple(
        (name, id(m), type(m), type(m).forward, state.get("forward"), tuple(state["_parameters"]),
         tuple(k for k, v in state["_buffers"].items() if v is not None),
         len(state["_forward_hooks"]), len(state["_forward_pre_hooks"]), len(state["_backward_hooks"]),
         len(state["_backward_pre_hooks"]),
         tuple(item for item in state.items() if item[0][0] != "_" and item[0] != "training" and type(item[1]) in _KEYED))
        for name, m in model.named_modules(remove_duplicate=False) for state in (vars(m),))


def _trace_chain(model: nn.Module) -> Chain | None:
    # fx traces the class's forward: an instance `forward` (or a hook) would go unseen
    if any("forward" in vars(m) or any(len(getattr(m, hooks)) for hooks in _MODULE_HOOKS) for m in model.modules()):
        return None
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001 - fx cannot trace it (control flow on values, ...): not provable
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    chain: list[tuple[str, nn.Module]] = []
    node = placeholders[0]
    while True:
        consumer = _single_consumer(node)
        if consumer is None:
            return None
        if consumer.op == "output":
            return tuple(chain) if chain and consumer.args[0] is node else None
        layer = _as_layer(model, consumer, node)
        if layer is None:
            return None
        chain.append(layer)
        node = consumer


def _single_consumer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node that consumes `node`, not counting reads of its batch size that feed only that
    node (the `x.size(0)` of `x.view(x.size(0), -1)`)."""
    main = [u for u in node.users if not _is_shape_read(u)]
    if len(main) != 1 or not all(read is main[0] or _feeds_only(read, node, main[0]) for read in node.users):
        return None
    return main[0]


def _feeds_only(read: torch.fx.Node, source: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    """`read` gives only dimension 0 of `source`, to `consumer` alone."""
    sizes = [read] if _is_size0(read) else list(read.users)
    return bool(sizes) and all(_batch_size_node(s, source) is s and set(s.users) == {consumer} for s in sizes)


def _is_shape_read(node: torch.fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "size")
            or (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)))


def _is_size0(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size" and node.args[1:] == (0,)


def _batch_size_node(node: object, source: torch.fx.Node) -> torch.fx.Node | None:
    """`node` itself if it reads dimension 0 of `source`: `x.size(0)`, `x.shape[0]` or `x.size()[0]`."""
    if not isinstance(node, torch.fx.Node):
        return None
    if _is_size0(node) and node.args[0] is source:
        return node
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        holder = node.args[0]
        if isinstance(holder, torch.fx.Node) and _is_shape_read(holder) and holder.args[0] is source \
                and holder.args[1:] in ((), ("shape",)):
            return node
    return None


def _as_layer(model: nn.Module, node: torch.fx.Node, source: torch.fx.Node) -> tuple[str, nn.Module] | None:
    """`node` (applied to `source`) as a (name, module) layer, or None if it is not a known layer."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        known = type(module) in _LAYER_TYPES and _computable(module)
        return (str(node.target), module) if known and node.args == (source,) and not node.kwargs else None
    if _is_relu(node, source):
        return "", nn.ReLU()
    if _is_flatten(node, source):
        return "", nn.Flatten()
    return None


def _computable(module: nn.Module) -> bool:
    """Whether a known layer's settings are ones `fused_block.chain_layer` computes as its `forward` does."""
    if type(module) is nn.BatchNorm2d:
        return batch_norm_with_batch_statistics(module)
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros"
    if type(module) is nn.MaxPool2d:
        return not module.return_indices
    return True


def _is_relu(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    if node.args != (source,) or set(node.kwargs) - {"inplace"}:
        return False
    return ((node.op == "call_function" and node.target in _RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target == "relu" and not node.kwargs))


def _is_flatten(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    args, kwargs = node.args, node.kwargs
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method"
                                                                        and node.target == "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return args[:1] == (source,) and start == 1 and end == -1 and set(kwargs) <= {"start_dim", "end_dim"}
    if node.op == "call_method" and node.target in ("view", "reshape") and not kwargs:
        return len(args) == 3 and args[0] is source and args[2] == -1 and _batch_size_node(args[1], source) is not None
    return False
