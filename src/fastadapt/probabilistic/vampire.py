"""VAMPIRE / ABML-style variational meta-learning: a Gaussian distribution over the weights.

Meta-learned: a diagonal Gaussian prior `p(w) = N(mu, sigma^2)` over every weight of the model
(`mu` is the model's own parameters, `log sigma` one tensor per parameter). For a task, the
variational posterior `q(w) = N(m, s^2)` starts at the prior and takes `inner_steps` SGD steps on
the support set's negative ELBO,

    mean over S reparameterised samples w = m + s * eps of loss(f(x; w), y) + kl_weight * KL(q || p),

(Nguyen et al. 2020, VAMPIRE; Ravi & Beatson 2019, ABML). The outer loss is the same on the query
set at the adapted `q` (the expected query loss plus the weighted KL), differentiated through the
inner steps (second order, or first order with `first_order`). Predictions average the class
probabilities (or outputs) of `eval_samples` samples of the adapted `q`. The S samples of a task
run as one batched graph (`probabilistic.base.stacked_forward`); for a vmap-exact model (an MLP)
the tasks of a meta-batch run in one vmap call too.

Example:
    >>> import torch
    >>> from fastadapt.nn import MLP
    >>> from fastadapt.data import SinusoidTasks
    >>> learner = VAMPIRE(MLP(1, [16], 1), inner_lr=0.01, task="regression", samples=2)
    >>> loss, metrics = learner.meta_loss(SinusoidTasks().task_batch(0, 2))
    >>> loss.backward(); sorted(metrics)
    ['kl', 'loss', 'support_loss']
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms.objectives import TaskKind, predictive_mean, task_loss, task_metrics
from ..data.episodes import TaskBatch
from ..functional import Params, adapt, sgd
from .base import SamplingLearner, check_count, refuse_frozen, stacked_forward
from .gaussian import kl_divergence, log_std_like, reparameterised
from .sampling import gaussian_noise

__all__ = ["VAMPIRE"]


class VAMPIRE(SamplingLearner):
    """Variational MAML with a meta-learned Gaussian prior over the weights (see the module docstring).

    Args:
        model: any module; its parameters are the prior's mean.
        inner_lr, inner_steps: SGD on the variational parameters (mean and log std) per task.
        eval_inner_steps: inner steps in evaluation (default `inner_steps`).
        samples / eval_samples: weight samples per task in training / evaluation.
        kl_weight: the weight of KL(q || p) (summed over every weight) in the inner and outer loss.
        prior_std: the prior's initial standard deviation (every weight).
        first_order: drop the second-order terms of the meta-gradient.
        seed: the draws' seed (`probabilistic.sampling`).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, *, eval_inner_steps: int | None = None,
                 samples: int = 2, eval_samples: int = 10, kl_weight: float = 1e-6, prior_std: float = 0.01,
                 first_order: bool = False, seed: int = 0, task: TaskKind = "classification") -> None:
        refuse_frozen("VAMPIRE", model)
        super().__init__(model, samples=samples, eval_samples=eval_samples, seed=seed, task=task)
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        self.inner_lr, self.inner_steps = float(inner_lr), check_count("inner_steps", inner_steps)
        self.eval_inner_steps = check_count("eval_inner_steps", eval_inner_steps or inner_steps)
        self.kl_weight, self.first_order = float(kl_weight), first_order
        self.names = [name for name, _ in model.named_parameters()]
        self.log_std = nn.ParameterList(
            nn.Parameter(t) for t in log_std_like(dict(model.named_parameters()), prior_std).values())

    def prior(self) -> tuple[Params, Params]:
        """The prior's mean and log standard deviation, by parameter name (the live tensors)."""
        return dict(self.model.named_parameters()), dict(zip(self.names, self.log_std))

    def _negative_elbo(self, mean: Params, log_std: Params, noise: Params, x: Tensor, y: Tensor,
                       prior: tuple[Params, Params]) -> tuple[Tensor, Tensor, Tensor]:
        """The expected loss over the samples `noise` gives, the KL, and the samples' outputs."""
        outputs = stacked_forward(self.model)(reparameterised(mean, log_std, noise), x)
        expected = torch.stack([task_loss(self.task, out, y) for out in outputs]).mean()
        kl = kl_divergence(mean, log_std, *prior)
        return expected + self.kl_weight * kl, kl, outputs

    def posterior(self, support_x: Tensor, support_y: Tensor, steps: int, noise: Params,
                  first_order: bool) -> tuple[Params, Params, Tensor]:
        """The task's variational mean and log std after `steps` SGD steps on the support set's
        negative ELBO (`noise[name][k]`: the samples of step k), and the support loss before adapting."""
        prior = self.prior()
        start = {**{f"mean.{n}": p for n, p in prior[0].items()}, **{f"log_std.{n}": s for n, s in prior[1].items()}}

        def split(point: Params) -> tuple[Params, Params]:
            return ({n: point[f"mean.{n}"] for n in self.names}, {n: point[f"log_std.{n}"] for n in self.names})

        def support_loss(point: Params, step: int) -> Tensor:
            return self._negative_elbo(*split(point), _at(noise, step), support_x, support_y, prior)[0]

        trajectory = adapt(support_loss, start, optimizer=sgd(self.inner_lr), steps=steps, first_order=first_order)
        return (*split(trajectory.points[-1]), trajectory.losses[0])

    def _noise(self, steps: int, samples: int, gen: torch.Generator) -> Params:
        """Standard normal noise `(steps + 1, samples, *p.shape)` per parameter: the samples of each
        inner step, then the query step's."""
        like = dict(self.model.named_parameters())
        per_step = [gaussian_noise(like, samples, gen) for _ in range(steps + 1)]
        return {n: torch.stack([step[n] for step in per_step]) for n in like}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean outer loss (expected query loss + kl_weight * KL) over the tasks (all at once for a
        vmap-exact model, else one task's graph alive at a time); metrics of the predictive mean."""
        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, noise: Params) -> tuple[Tensor, dict[str, Tensor]]:
            mean, log_std, support_loss = self.posterior(sx, sy, self.inner_steps, noise, self.first_order)
            loss, kl, outputs = self._negative_elbo(mean, log_std, _at(noise, self.inner_steps), qx, qy, self.prior())
            row = task_metrics(self.task, predictive_mean(self.task, outputs.detach(), 0), qy)
            return loss, {**row, "kl": kl.detach(), "support_loss": support_loss.detach()}

        return self.meta_batch_loss(batch, one_task,
                                    lambda t: self._noise(self.inner_steps, self.samples, self.training_generator(t)))

    def task_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None, samples: int,
                     gen: torch.Generator) -> Params:
        steps = steps or self.eval_inner_steps
        noise = self._noise(steps, samples, gen)
        mean, log_std, _ = self.posterior(support_x, support_y, steps, noise, first_order=True)
        return {n: w.detach() for n, w in reparameterised(mean, log_std, _at(noise, steps)).items()}


def _at(noise: Params, step: int) -> Params:
    """Step `step`'s samples of `(steps + 1, samples, ...)` noise."""
    return {n: v[step] for n, v in noise.items()}
