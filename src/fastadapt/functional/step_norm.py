"""Per-inner-step BatchNorm (MAML++): weights and biases per step, running statistics per step.

The forward at θ_s, the parameters after s inner steps (s = 0 .. steps; the query forward after
the last step is s = steps), uses slot s of every BatchNorm layer:

- weights (BNWB): each layer's `weight` and `bias` are replaced by `weight[s]`, `bias[s]`,
  meta-learned per step and not adapted in the inner loop (as in the MAML++ code).
- statistics (BNRS): per-step running mean and variance. In training every forward still
  normalises with its own batch's statistics (MAML's transductive convention: the gradients flow
  through them) and slot s's running statistics are updated from that batch, without gradient.
  Under transductive batch statistics the running statistics never enter a training forward, so
  they change nothing there; they matter only where evaluation normalises with them. In
  evaluation (`training=False`) every forward at θ_s normalises with slot s's running statistics
  and nothing is updated: inductive, so a query's prediction no longer depends on the other
  queries of its task (nor the support set's statistics).

The statistics work by intercepting `F.batch_norm` (a `TorchFunctionMode`): the k-th call of one
forward is the k-th BatchNorm layer of `model.named_modules()`; a forward that calls them in
another order or number is refused with an error. The reordered first conv block
(`functional.fused_block`) computes its normalisation without `F.batch_norm`, so the statistics'
forwards run unfused (the step context enters `fused_block.unfused()`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .fused_block import unfused

__all__ = ["PerStepBatchNorm", "batch_norm_layers"]


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """`(name, module)` of every BatchNorm layer of `model`, in `named_modules()` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class PerStepBatchNorm(nn.Module):
    """Per-step BatchNorm weights (`weights=True`) and running statistics (`statistics=True`)
    for the BatchNorm layers of `model`, for the forwards at θ_0 .. θ_steps (`steps + 1` slots).

    `hooks(training)` gives the `functional.inner_loop.StepHooks` the inner loop applies at each step.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> norm = PerStepBatchNorm(Conv4.omniglot(ways=5), steps=5)
        >>> tuple(norm.weights[0].shape), sorted(norm.hooks(training=True).params(2))[:2]
        ((6, 64), ['features.1.bias', 'features.1.weight'])
    """

    def __init__(self, model: nn.Module, steps: int, *, weights: bool = True, statistics: bool = False,
                 momentum: float = 0.1) -> None:
        super().__init__()
        layers = batch_norm_layers(model)
        if not layers:
            raise ValueError("per-step BatchNorm weights or statistics need a model with BatchNorm layers; "
                             f"{type(model).__name__} has none")
        if not (weights or statistics):
            raise ValueError("PerStepBatchNorm needs weights=True or statistics=True (or both)")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        for name, m in layers:
            if weights and not m.affine:
                raise ValueError(f"per-step BatchNorm weights need affine BatchNorm layers; {name!r} has affine=False")
            if statistics and m.track_running_stats:
                raise ValueError(f"per-step BatchNorm statistics replace a layer's own running statistics; {name!r} "
                                 "tracks its own (build it with track_running_stats=False)")
        self.names = [name for name, _ in layers]
        self.features = [m.num_features for _, m in layers]
        self.eps = [m.eps for _, m in layers]
        self.slots = steps + 1
        self.momentum = momentum
        self.weights: nn.ParameterList | None = None
        self.biases: nn.ParameterList | None = None
        if weights:
            self.weights = nn.ParameterList(nn.Parameter(m.weight.detach().repeat(self.slots, 1)) for _, m in layers)
            self.biases = nn.ParameterList(nn.Parameter(m.bias.detach().repeat(self.slots, 1)) for _, m in layers)
        self.statistics = statistics
        if statistics:
            reference = layers[0][1].weight if layers[0][1].affine else None
            kind = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
            for i, c in enumerate(self.features):
                self.register_buffer(f"running_mean_{i}", torch.zeros(self.slots, c, **kind))
                self.register_buffer(f"running_var_{i}", torch.ones(self.slots, c, **kind))

    def running(self, layer: int) -> tuple[Tensor, Tensor]:
        """Running mean and variance of BatchNorm layer `layer`, `(steps + 1, C)` each."""
        return getattr(self, f"running_mean_{layer}"), getattr(self, f"running_var_{layer}")

    def hooks(self, training: bool, update: bool = True) -> "_Hooks":
        """The step hooks: training normalises with batch statistics and (with `update`) updates
        the running ones; evaluation normalises with the running statistics."""
        return _Hooks(self, training, update)


class _Hooks:
    def __init__(self, owner: PerStepBatchNorm, training: bool, update: bool) -> None:
        self.owner = owner
        self.training = training
        self.update = update

    def params(self, step: int) -> dict[str, Tensor]:
        owner = self.owner
        if owner.weights is None or owner.biases is None:
            return {}
        self._check(step)
        out = {}
        for name, weight, bias in zip(owner.names, owner.weights, owner.biases):
            out[f"{name}.weight"] = weight[step]
            out[f"{name}.bias"] = bias[step]
        return out

    def context(self, step: int) -> contextlib.AbstractContextManager:
        if not self.owner.statistics:
            return contextlib.nullcontext()
        self._check(step)
        return _unfused_statistics(_StepStatistics(self.owner, step, self.training, self.update))

    def _check(self, step: int) -> None:
        if not 0 <= step < self.owner.slots:
            raise ValueError(f"per-step BatchNorm has slots for {self.owner.slots - 1} inner steps; step {step} "
                             f"was asked for (use at most {self.owner.slots - 1} inner steps)")


@contextlib.contextmanager
def _unfused_statistics(statistics: "_StepStatistics") -> Iterator[None]:
    with unfused(), statistics:
        yield


class _StepStatistics(TorchFunctionMode):
    """Within one forward at θ_step: record batch statistics (training) or normalise with slot
    `step`'s running statistics (evaluation). Recorded statistics update the buffers on exit, after
    any `torch.func` transform around the forward has finished."""

    def __init__(self, owner: PerStepBatchNorm, step: int, training: bool, update: bool) -> None:
        super().__init__()
        self.owner = owner
        self.step = step
        self.training = training
        self.update = update
        self.calls = 0
        self.records: list[tuple[int, Tensor, Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        return self._batch_norm(*args, **kwargs)

    def _batch_norm(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
        layer = self.calls
        self.calls += 1
        owner = self.owner
        if layer >= len(owner.names) or input.shape[1] != owner.features[layer] or running_mean is not None:
            raise RuntimeError(
                f"per-step BatchNorm statistics expect one batch_norm call per BatchNorm layer per forward, in the "
                f"order {owner.names} (channels {owner.features}, no running statistics of their own); call "
                f"{layer + 1} has {input.shape[1]} channels")
        if self.training:
            if self.update:
                with torch.no_grad():
                    dims = [0, *range(2, input.dim())]
                    self.records.append((layer, input.detach().mean(dims), input.detach().var(dims, unbiased=True)))
            return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
        mean, var = owner.running(layer)
        return F.batch_norm(input, mean[self.step].to(input.dtype), var[self.step].to(input.dtype), weight, bias,
                            False, 0.0, eps)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if exc[0] is None and self.calls not in (0, len(self.owner.names)):  # 0: no forward in the context
            self.records.clear()
            raise RuntimeError(f"per-step BatchNorm statistics saw {self.calls} batch_norm calls in one forward; the "
                               f"model has {len(self.owner.names)} BatchNorm layers ({self.owner.names})")
        if exc[0] is None:
            m = self.owner.momentum
            with torch.no_grad():
                for layer, mean, var in self.records:
                    running_mean, running_var = self.owner.running(layer)
                    running_mean[self.step].mul_(1 - m).add_(mean.to(running_mean.dtype), alpha=m)
                    running_var[self.step].mul_(1 - m).add_(var.to(running_var.dtype), alpha=m)
        self.records.clear()
