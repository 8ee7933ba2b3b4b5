"""PLATIPUS (Finn, Xu & Levine 2018): a learned distribution over initialisations, sampled per task.

Meta-learned: the prior mean `mu` (the model's parameters), the prior's log std `log sigma`, the
posterior's log std `log v`, and two step sizes `gamma_p`, `gamma_q`. A task's initialisation is
sampled, then adapted by MAML's inner loop:

- training: `theta ~ q = N(mu - gamma_q grad L(mu; query), v^2)` (the inference network is one
  gradient step on the query set), adapted on the support set; the outer loss is the query loss
  after adaptation plus `kl_weight * KL(q || p)` with `p = N(mu - gamma_p grad L(mu; support), sigma^2)`;
- evaluation: `eval_samples` draws `theta ~ p` (support set only), each adapted, probabilities averaged.

The sampled initialisations enter the MAML engine through its per-task initial parameters
(`GradientLearner.meta_loss(batch, initial=...)`), so every execution path of MAML serves PLATIPUS
and the meta-gradient flows back through the samples into `mu`, `v`, `gamma_q` (reparameterised)
and through the KL into `sigma` and `gamma_p`.

Example:
    >>> import torch
    >>> from fastadapt.nn import MLP
    >>> from fastadapt.data import SinusoidTasks
    >>> learner = PLATIPUS(MLP(1, [16], 1), inner_lr=0.01, task="regression")
    >>> loss, metrics = learner.meta_loss(SinusoidTasks().task_batch(0, 2))
    >>> loss.backward(); sorted(metrics)
    ['kl', 'loss', 'support_loss']
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms.gradient import GradientLearner
from ..algorithms.objectives import TaskKind, task_loss
from ..data.episodes import TaskBatch
from ..functional import Params
from ..functional.task_gradients import task_gradients
from .base import SamplingLearner, check_count
from .gaussian import kl_divergence, log_std_like, reparameterised
from .sampling import gaussian_noise

__all__ = ["PLATIPUS"]


class PLATIPUS(SamplingLearner):
    """Probabilistic MAML with a learned distribution over initialisations (see the module docstring).

    Args:
        model: any module; its parameters are the prior mean `mu`.
        inner_lr, inner_steps, eval_inner_steps: MAML's inner loop from each sampled initialisation.
        samples / eval_samples: initialisations sampled per task in training / evaluation (training
            repeats each task `samples` times).
        kl_weight: the weight of KL(q || p), summed over every weight.
        prior_std / posterior_std: initial sigma and v (every weight).
        first_order: MAML's first-order meta-gradient (the sampling stays reparameterised).
        seed: the draws' seed (`probabilistic.sampling`).
        **maml_options: passed to the inner `GradientLearner` (execution, task_workers, ...).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, *,
                 eval_inner_steps: int | None = None, samples: int = 1, eval_samples: int = 10,
                 kl_weight: float = 1e-6, prior_std: float = 0.01, posterior_std: float = 0.01,
                 first_order: bool = False, seed: int = 0, task: TaskKind = "classification", **maml_options) -> None:
        super().__init__(model, samples=samples, eval_samples=eval_samples, seed=seed, task=task)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        # MAML's engine over the same module; not a submodule (its only parameters are the model's)
        self.__dict__["maml"] = GradientLearner(model, inner_lr, inner_steps, first_order=first_order, task=task,
                                                **maml_options)
        self.eval_inner_steps = check_count("eval_inner_steps", eval_inner_steps or inner_steps)
        self.kl_weight = float(kl_weight)
        params = dict(model.named_parameters())
        self.names = list(params)
        self.prior_log_std = nn.ParameterList(nn.Parameter(t) for t in log_std_like(params, prior_std).values())
        self.posterior_log_std = nn.ParameterList(nn.Parameter(t) for t in log_std_like(params, posterior_std).values())
        self.gamma_p = nn.Parameter(torch.tensor(float(inner_lr)))
        self.gamma_q = nn.Parameter(torch.tensor(float(inner_lr)))

    def _stepped(self, x: Tensor, y: Tensor, gamma: Tensor, create_graph: bool) -> Params:
        """`mu - gamma * grad L(mu; x[t], y[t])` for every task t (`x`: `(T, N, ...)`): one
        differentiable gradient step from the prior mean per task, `(T, *p.shape)`, all tasks at
        once where that is exact (`functional.task_gradients`); frozen parameters do not move."""
        mu = self.maml.meta_params()
        trainable = {n: p for n, p in mu.items() if p.requires_grad}
        grads = task_gradients(self.model, trainable, x, y, lambda out, target: task_loss(self.task, out, target),
                               frozen={n: p for n, p in mu.items() if n not in trainable}, create_graph=create_graph)
        return {n: p - gamma * grads[n] if n in grads else p.expand(x.shape[0], *p.shape) for n, p in mu.items()}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """MAML's query loss from the sampled initialisations (each task `samples` times) plus
        `kl_weight` times the mean KL(q || p) over tasks."""
        prior_std = dict(zip(self.names, self.prior_log_std))
        posterior_std = dict(zip(self.names, self.posterior_log_std))
        q_means = self._stepped(batch.query_x, batch.query_y, self.gamma_q, create_graph=True)
        p_means = self._stepped(batch.support_x, batch.support_y, self.gamma_p, create_graph=True)
        kl = kl_divergence(q_means, posterior_std, p_means, prior_std) / len(batch)  # the mean over tasks
        draws = [gaussian_noise(self.maml.meta_params(), self.samples, self.training_generator(t))
                 for t in range(len(batch))]
        noise = {n: torch.stack([d[n] for d in draws]) for n in self.names}           # (T, S, *p.shape)
        thetas = reparameterised({n: m.unsqueeze(1) for n, m in q_means.items()}, posterior_std, noise)
        initial = {n: theta.flatten(0, 1) for n, theta in thetas.items()}            # task t at rows t*S ..
        repeated = _repeat_tasks(batch, self.samples)
        loss, metrics = self.maml.meta_loss(repeated, initial=initial)
        self.advance()
        return loss + self.kl_weight * kl, {**metrics, "kl": kl.detach()}

    def task_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None, samples: int,
                     gen: torch.Generator) -> Params:
        steps = self.maml._check_steps(steps or self.eval_inner_steps)
        stepped = self._stepped(support_x.unsqueeze(0), support_y.unsqueeze(0), self.gamma_p, create_graph=False)
        p_mean = {n: p[0].detach() for n, p in stepped.items()}
        prior_std = {n: s.detach() for n, s in zip(self.names, self.prior_log_std)}
        thetas = reparameterised(p_mean, prior_std, gaussian_noise(p_mean, samples, gen))
        adapted = []
        for s in range(samples):
            points, _ = self.maml._adapt_task({n: v[s] for n, v in thetas.items()}, support_x, support_y, steps,
                                              True, None)
            adapted.append(points[-1])
        return {n: torch.stack([a[n].detach() for a in adapted]) for n in self.names}


def _repeat_tasks(batch: TaskBatch, times: int) -> TaskBatch:
    """Each task of `batch` `times` times in a row (task t at rows t*times .. t*times + times - 1)."""
    if times == 1:
        return batch
    return TaskBatch(*(t.repeat_interleave(times, 0) for t in (batch.support_x, batch.support_y, batch.query_x,
                                                                 batch.query_y)))
