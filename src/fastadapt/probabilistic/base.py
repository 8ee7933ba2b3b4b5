"""What every sampling learner shares: several weight samples (or particles) per task, drawn
from explicit generators, and predictions that average over them.

- training draws from `(seed, outer step, task)`; the outer step is the `draws` buffer, which
  checkpoints keep (a resumed run draws what the uninterrupted one drew);
- evaluation draws from `(seed, a checksum of the task's support set)`: an episode's samples do
  not depend on its batch, its order or the thread it ran in;
- `query_samples` gives `(T, queries, samples, outputs)`; `query_outputs` their predictive mean:
  the log of the mean class probabilities (classification), the mean output (regression).

Example:
    >>> import torch
    >>> from fastadapt.nn import MLP
    >>> forward = stacked_forward(MLP(1, [8], 1))
    >>> params = {n: p.detach().expand(3, *p.shape) for n, p in MLP(1, [8], 1).named_parameters()}
    >>> forward(params, torch.zeros(4, 1)).shape
    torch.Size([3, 4, 1])
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..algorithms.base import Learner, module_mode
from ..algorithms.objectives import TaskKind, check_kind, predictive_mean
from ..data.episodes import TaskBatch
from ..functional import Params, forward, loss_with_grads
from ..functional.planner import vmap_exact
from ..functional.task_batched import looped_forward, task_batched_forward
from .sampling import EVALUATION, TRAINING, generator, task_checksum

__all__ = ["SamplingLearner", "SampledPredictor", "stacked_forward", "check_count", "refuse_frozen"]


def stacked_forward(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """`run(params (S, *p.shape), x (N, ...)) -> (S, N, out)`: the model under S weight sets at
    once on the same inputs: one grouped-convolution graph where the model's structure allows
    (`functional.task_batched`), `torch.func.vmap` over the weight sets for a vmap-exact model
    (`functional.planner.vmap_exact`), else one call per weight set (exact each way, to second order)."""
    def run(params: Params, x: Tensor) -> Tensor:
        samples = next(iter(params.values())).shape[0]
        batched = task_batched_forward(model) if x.dim() == 4 else None
        if batched is None and vmap_exact(model):
            return vmap(lambda weights: forward(model, weights, x), randomness="different")(params)
        return (batched or looped_forward(model))(params, x.unsqueeze(0).expand(samples, *x.shape))

    return run


def refuse_frozen(learner: str, model: nn.Module) -> None:
    """Raises for a model with frozen parameters: `learner` puts a distribution on every weight.

    Example:
        >>> refuse_frozen("VAMPIRE", nn.Linear(2, 1))
    """
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"{learner} puts a distribution on every weight of the model, but {frozen} are frozen "
                         f"(requires_grad=False): unfreeze them, or use PLATIPUS or MAML, which keep frozen "
                         f"weights fixed")


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class SampledPredictor(nn.Module):
    """One task's predictor: `predictor(x)` is the predictive mean of its weight samples,
    `predictor.samples(x)` every sample's outputs `(S, N, out)`. The model is not a submodule.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> w = {n: p.detach().expand(3, *p.shape) for n, p in lin.named_parameters()}
        >>> SampledPredictor(lin, w, "classification")(torch.zeros(4, 2)).shape
        torch.Size([4, 2])
    """

    def __init__(self, model: nn.Module, weights: Params, kind: TaskKind) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.weights, self.kind = weights, kind
        self.train(model.training)

    def samples(self, x: Tensor) -> Tensor:
        with module_mode(self.model, self.training):
            return stacked_forward(self.model)(self.weights, x)

    def forward(self, x: Tensor) -> Tensor:
        return predictive_mean(self.kind, self.samples(x), 0)


class SamplingLearner(Learner):
    """Base of the learners that predict by samples: `samples` per task in training,
    `eval_samples` in evaluation, draws from `seed` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, samples: int, eval_samples: int, seed: int, task: TaskKind) -> None:
        super().__init__()
        self.model = model
        self.samples = check_count("samples", samples)
        self.eval_samples = check_count("eval_samples", eval_samples)
        self.seed = int(seed)
        self.task = check_kind(task)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def training_generator(self, task: int) -> torch.Generator:
        """The generator of task `task` of the current outer step."""
        return generator(self.seed, TRAINING, int(self.draws), task)

    def evaluation_generator(self, support_x: Tensor, support_y: Tensor) -> torch.Generator:
        """The generator of the episode with this support set."""
        return generator(self.seed, EVALUATION, task_checksum(support_x, support_y))

    def taskwise_meta_loss(self, tasks: int, task_loss: Callable[[int], tuple[Tensor, dict[str, Tensor]]]
                           ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean of `task_loss(t) -> (loss, metrics)` over `tasks` tasks, each task's loss
        back-propagated as soon as it exists (one task's graph alive at a time): a loss whose
        `backward()` deposits the summed gradients, and the tasks' metrics averaged. Advances the draws.
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        totals = [torch.zeros_like(p) for p in trainable]
        losses, rows = [], []
        for t in range(tasks):
            loss, row = task_loss(t)
            if torch.is_grad_enabled():
                grads = torch.autograd.grad(loss / tasks, trainable, allow_unused=True)
                totals = [total if g is None else total + g for total, g in zip(totals, grads)]
            losses.append(loss.detach())
            rows.append(row)
        self.advance()
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        return loss_with_grads(torch.stack(losses).mean(), trainable, totals), metrics

    def meta_batch_loss(self, batch: TaskBatch, one_task: Callable[..., tuple[Tensor, dict[str, Tensor]]],
                        draw: Callable[[int], Params] = lambda t: {}) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean of `one_task(support_x, support_y, query_x, query_y, draw(t)) -> (loss, metrics)`
        over the tasks, and their mean metrics (`draw(t)`: task t's random tensors). For a
        vmap-exact model all tasks run in one `torch.func.vmap` call (every task's graph alive at
        once, as MAML's vmap path); otherwise task by task, one task's graph and draws alive at a
        time (`taskwise_meta_loss`). Advances the draws.
        """
        if vmap_exact(self.model):
            draws = [draw(t) for t in range(len(batch))]
            stacked = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
            losses, rows = vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x,
                                                                  batch.query_y, stacked)
            self.advance()
            return losses.mean(), {k: v.mean() for k, v in rows.items()}

        def task(t: int) -> tuple[Tensor, dict[str, Tensor]]:
            ep = batch[t]
            return one_task(ep.support_x, ep.support_y, ep.query_x, ep.query_y, draw(t))

        return self.taskwise_meta_loss(len(batch), task)

    def advance(self) -> None:
        """One outer step drawn: the next meta_loss draws afresh (only with gradients on)."""
        if torch.is_grad_enabled():
            self.draws += 1

    @abc.abstractmethod
    def task_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None, samples: int,
                     gen: torch.Generator) -> Params:
        """`samples` adapted weight sets `(S, *p.shape)` for one task, in evaluation (no outer graph)."""

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> SampledPredictor:
        """The predictor of one task: `eval_samples` weight sets adapted to its support set."""
        gen = self.evaluation_generator(support_x, support_y)
        return SampledPredictor(self.model, self.task_weights(support_x, support_y, steps, self.eval_samples, gen),
                                self.task)

    def _query_samples(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        forward = stacked_forward(self.model)
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            weights = self.task_weights(ep.support_x, ep.support_y, inner_steps, self.eval_samples,
                                        self.evaluation_generator(ep.support_x, ep.support_y))
            rows.append(forward(weights, ep.query_x).detach().transpose(0, 1))  # (queries, S, out)
        return torch.stack(rows)

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        return predictive_mean(self.task, self._query_samples(batch, inner_steps), 2)
