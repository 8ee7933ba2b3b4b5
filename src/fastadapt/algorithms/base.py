"""The one interface every meta-learner implements: `Learner`, and its predictor, `AdaptedModel`.

Trainer, evaluation (and robustness, calibration) talk to a `Learner` alone:

- `meta_loss(batch) -> (loss, metrics)`: the outer loss of a `TaskBatch`, `loss.backward()`
  depositing the meta-gradient; runs the module in the learner's mode (train mode unless you
  called `learner.eval()`, as for any `nn.Module`);
- `adapt(support_x, support_y) -> predictor`: an `nn.Module` predicting for that task;
- `query_outputs(batch)`, `query_samples(batch)` and `task_metrics(batch)`: evaluation, in eval mode (Dropout off,
  BatchNorm with running statistics reads them and never updates them), with no outer graph, and
  never writing into the module's parameters or buffers; the module's modes are restored after.

BatchNorm without running statistics (`fastadapt.nn` backbones) normalises each task by its own
batch statistics in both modes: MAML's transductive convention, unchanged by eval mode.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import Params, forward
from .objectives import TaskKind, task_metrics

__all__ = ["Learner", "AdaptedModel", "EpisodePredictor", "module_mode"]


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """`module` and all its submodules in train (`training=True`) or eval mode within the block,
    each restored to its own mode after.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.5))
        >>> with module_mode(net, training=False):
        ...     net[0].training
        False
        >>> net[0].training
        True
    """
    before = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, mode in before:
            m.training = mode


class AdaptedModel(nn.Module):
    """A task-adapted predictor: `predictor(x)` runs `model` with the adapted `params`.

    Holds parameters, not a copy of the module, and never writes into its parameters or buffers.
    It predicts in `training` mode, by default the mode the module was in when the learner adapted
    (eval mode during evaluation, or after `learner.eval()` or `model.eval()`); `context` (optional) gives the
    context each prediction runs in (per-step BatchNorm statistics). The model is not registered
    as a submodule: `predictor.eval()` concerns the predictor alone.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> predictor = AdaptedModel(lin, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> predictor(torch.ones(3, 2)).squeeze(1)
        tensor([2., 2., 2.])
    """

    def __init__(self, model: nn.Module, params: Params, training: bool | None = None,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a submodule (see the class docstring)
        self.params = params
        self.context = context
        self.train(model.training if training is None else training)

    def forward(self, x: Tensor) -> Tensor:
        with module_mode(self.model, self.training), (self.context() if self.context else contextlib.nullcontext()):
            return forward(self.model, self.params, x)


class EpisodePredictor(nn.Module):
    """A predictor for one episode of a learner that needs no adapted weights (ProtoNet, Matching
    Networks): `predict(support_x, support_y, query_x)` with the support set kept, running `module`
    in the mode it had when the predictor was made. `module` is not registered as a submodule.

    Example:
        >>> predictor = EpisodePredictor(nn.Identity(), lambda sx, sy, qx: qx + sx.sum(), torch.ones(2), None)
        >>> predictor(torch.zeros(1))
        tensor([2.])
    """

    def __init__(self, module: nn.Module, predict: Callable[[Tensor, Tensor, Tensor], Tensor], support_x: Tensor,
                 support_y: Tensor) -> None:
        super().__init__()
        self.__dict__["module"] = module
        self.predict, self.support_x, self.support_y = predict, support_x, support_y
        self.train(module.training)

    def forward(self, query_x: Tensor) -> Tensor:
        with module_mode(self.module, self.training):
            return self.predict(self.support_x, self.support_y, query_x)


class Learner(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every meta-learner (see the module docstring for the contract).

    Subclasses implement `meta_loss`, `adapt` and `_query_outputs`, and may extend
    `_task_metrics` (the default: loss and accuracy of `_query_outputs`). `task` is
    "classification" or "regression"; `task_workers` is how many episode batches evaluation may
    run at once in threads (1 unless the learner's forward is thread-safe).

    Example:
        >>> from fastadapt.nn import MLP
        >>> from fastadapt import MAML, SinusoidTasks
        >>> learner = MAML(MLP(), 0.01, task="regression")
        >>> isinstance(learner, Learner), sorted(learner.task_metrics(SinusoidTasks().task_batch(0, 2)))
        (True, ['loss', 'loss_before'])
    """

    task: TaskKind = "classification"
    task_workers: int = 1

    @abc.abstractmethod
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean outer loss over the batch (`backward()` gives the meta-gradient) and detached metrics."""

    @abc.abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """The predictor for the task whose support set is given, an `nn.Module`."""

    @abc.abstractmethod
    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """Every task's query outputs `(T, queries, outputs)`, in evaluation (see `query_outputs`)."""

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        outputs = self._query_outputs(batch, inner_steps)
        rows = [task_metrics(self.task, outputs[t], batch.query_y[t]) for t in range(len(batch))]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Eval mode for the learner and its module (restored after), no outer graph."""
        with module_mode(self, training=False), torch.no_grad():
            yield

    def query_outputs(self, batch: TaskBatch, inner_steps: int | None = None) -> Tensor:
        """Every task's query outputs after adaptation, `(T, queries, outputs)`, in evaluation:
        eval mode, no outer graph, nothing written into the module (what ensembles average)."""
        with self.evaluation():
            return self._query_outputs(batch, inner_steps)

    def _query_samples(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """Samples of every task's query outputs `(T, queries, samples, outputs)`: one, the outputs,
        unless the learner predicts by sampling (Bayesian learners, particles)."""
        return self._query_outputs(batch, inner_steps).unsqueeze(2)

    def query_samples(self, batch: TaskBatch, inner_steps: int | None = None) -> Tensor:
        """Every task's query outputs as samples of the learner's predictive distribution,
        `(T, queries, samples, outputs)` (one sample for a deterministic learner), in evaluation as
        `query_outputs`: calibration averages the samples' probabilities."""
        with self.evaluation():
            return self._query_samples(batch, inner_steps)

    def task_metrics(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task metrics after adaptation, `(T,)` tensors (`loss`, `accuracy` for
        classification, and what the learner adds), in evaluation as `query_outputs`."""
        with self.evaluation():
            return self._task_metrics(batch, inner_steps)
