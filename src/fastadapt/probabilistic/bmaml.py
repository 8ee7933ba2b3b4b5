"""Bayesian MAML (Yoon et al. 2018): M particles adapted by Stein variational gradient descent,
meta-learned with the chaser loss.

Meta-learned: M initial particles, each a full set of the model's weights (particle 0 starts at
the model's initialisation, the others at fresh initialisations of it). For a task, the particles
take `inner_steps` SVGD steps (`probabilistic.svgd`, RBF kernel, median heuristic) on the support
loss (the task's mean loss: SVGD on the tempered posterior `exp(-loss)`); the result, the
*chaser*, is pulled towards the *leader*, the chaser moved `chaser_steps` further SVGD steps on
support and query set together (a constant: no gradient through it):

    chaser loss = sum over particles of |theta_chaser - stopgrad(theta_leader)|^2

differentiated through the chaser's SVGD steps (second order, or first order with `first_order`).
Predictions average the class probabilities (or outputs) of the M adapted particles. The
particles of a task run as one batched graph (`probabilistic.base.stacked_forward`).

Example:
    >>> import torch
    >>> from fastadapt.nn import MLP
    >>> from fastadapt.data import SinusoidTasks
    >>> learner = BMAML(MLP(1, [16], 1), inner_lr=0.01, particles=3, task="regression")
    >>> loss, metrics = learner.meta_loss(SinusoidTasks().task_batch(0, 2))
    >>> loss.backward(); sorted(metrics)
    ['chaser_loss', 'loss', 'support_loss']
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..algorithms.objectives import TaskKind, predictive_mean, task_loss, task_metrics
from ..data.episodes import TaskBatch
from ..functional import Params, adapt
from .base import SamplingLearner, check_count, refuse_frozen, stacked_forward
from .svgd import svgd

__all__ = ["BMAML"]


def _fresh_particles(model: nn.Module, particles: int, seed: int) -> dict[str, Tensor]:
    """`(M, *p.shape)` per parameter: the model's own weights, then M - 1 fresh initialisations
    (each layer's `reset_parameters`, from `seed`)."""
    sets = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for m in range(1, particles):
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + m)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        sets.append({n: p.detach().clone() for n, p in fresh.named_parameters()})
    return {n: torch.stack([s[n] for s in sets]) for n in sets[0]}


class BMAML(SamplingLearner):
    """Bayesian MAML: SVGD particles and the chaser loss (see the module docstring).

    Args:
        model: any module; particle 0 starts at its weights.
        inner_lr, inner_steps, eval_inner_steps: the SVGD step size and steps per task.
        particles: M, the particles (training and evaluation).
        chaser_steps: the leader's further SVGD steps on support and query set.
        first_order: drop the second-order terms of the meta-gradient.
        seed: the other particles' initialisations.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, *, eval_inner_steps: int | None = None,
                 particles: int = 5, chaser_steps: int = 1, first_order: bool = False, seed: int = 0,
                 task: TaskKind = "classification") -> None:
        refuse_frozen("BMAML", model)
        super().__init__(model, samples=particles, eval_samples=particles, seed=seed, task=task)
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        self.inner_lr, self.inner_steps = float(inner_lr), check_count("inner_steps", inner_steps)
        self.eval_inner_steps = check_count("eval_inner_steps", eval_inner_steps or inner_steps)
        self.chaser_steps, self.first_order = check_count("chaser_steps", chaser_steps), first_order
        self.names = [n for n, _ in model.named_parameters()]
        self.particles = nn.ParameterList(nn.Parameter(t) for t in _fresh_particles(model, particles, seed).values())

    def initial_particles(self) -> Params:
        """The meta-learned initial particles `(M, *p.shape)` by parameter name."""
        return dict(zip(self.names, self.particles))

    def _svgd(self, particles: Params, x: Tensor, y: Tensor, steps: int, *, keep_graph: bool = True,
              first_order: bool = False) -> tuple[Params, Tensor]:
        forward = stacked_forward(self.model)

        def loss(point: Params, step: int) -> Tensor:
            return torch.stack([task_loss(self.task, out, y) for out in forward(point, x)]).sum()

        trajectory = adapt(loss, particles, optimizer=svgd(self.inner_lr), steps=steps, first_order=first_order,
                           keep_graph=keep_graph)
        return trajectory.points[-1], trajectory.losses[0] / len(self.particles[0])

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean chaser loss over the tasks (all at once for a vmap-exact model, else one task's
        graph alive at a time); metrics of the chaser's predictive mean on the query set."""
        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, _: Params) -> tuple[Tensor, dict[str, Tensor]]:
            loss, chaser, _, support_loss = self.chaser_loss(sx, sy, qx, qy)
            outputs = stacked_forward(self.model)({n: p.detach() for n, p in chaser.items()}, qx)
            row = task_metrics(self.task, predictive_mean(self.task, outputs, 0), qy)
            return loss, {**row, "chaser_loss": loss.detach(), "support_loss": support_loss.detach()}

        return self.meta_batch_loss(batch, one_task)

    def chaser_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                    leader: Params | None = None) -> tuple[Tensor, Params, Params, Tensor]:
        """One task's chaser loss, the chaser, the leader (computed, unless given: a constant either
        way) and the support loss before adapting."""
        chaser, support_loss = self._svgd(self.initial_particles(), support_x, support_y, self.inner_steps,
                                          first_order=self.first_order)
        if leader is None:
            both_x, both_y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
            leader, _ = self._svgd({n: p.detach() for n, p in chaser.items()}, both_x, both_y, self.chaser_steps,
                                   keep_graph=False)
        loss = sum(((chaser[n] - leader[n].detach()) ** 2).sum() for n in self.names)
        return loss, chaser, leader, support_loss

    def task_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None, samples: int,
                     gen: torch.Generator) -> Params:
        particles, _ = self._svgd({n: p.detach() for n, p in self.initial_particles().items()}, support_x, support_y,
                                  steps or self.eval_inner_steps, keep_graph=False)
        return {n: p.detach() for n, p in particles.items()}
