"""Robust meta-training: the outer loss sees attacked inputs, so the meta-learned model adapts to
clean support sets and still classifies attacked queries.

- "aq", adversarial querying (Goldblum et al. 2020): each task's query set is attacked against the
  *adapted* learner, and the outer loss is the loss on the attacked queries;
- "adml" (Yin et al. 2018, ADML-style): the support set is attacked too, against the parameters of
  each inner step, so the learner also adapts on attacked examples (gradient-based learners);
- "trades" (Zhang et al. 2019, TRADES-style): the outer loss is the clean query loss plus `beta`
  times the KL divergence from the clean to the attacked predictions, the attack maximising that
  divergence.

The attack is any `Attack`; the cheap default for training is FGSM from a random start (Wong et
al. 2020: `fgsm(eps, random_start=True)`, one gradient per attacked batch). The adapted parameters
are constants to the attacker and the attacked inputs are data (the meta-gradient does not flow
through the attack), as in the papers. Everything acts in train mode only: evaluation (eval mode)
sees the clean inputs, so a robust run reports clean accuracy and `fastadapt robustness` attacks it.

Random starts are drawn from a generator seeded by `seed` and the attacked inputs' own bytes: the
same batch gives the same perturbation, so training is reproducible, resumes exactly, and the
inner-loop checkpointing's replay sees the same inputs.

Gradient-based learners (the MAML family) take it as seams (`RobustTraining.seams`, see
`functional.seams`); Prototypical and Matching Networks as `robust=` (`episode_loss`).

Example:
    >>> import torch
    >>> from fastadapt import MAML
    >>> from fastadapt.nn import Conv4
    >>> from fastadapt.robust import fgsm
    >>> model = Conv4.omniglot(ways=5)
    >>> maml = MAML(model, 0.4, **RobustTraining("aq", fgsm(8 / 255, random_start=True)).seams(model))
    >>> maml.seams.query_hook is not None
    True
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import Params, forward
from ..functional.norm_relu_pool import under_vmap
from .attacks import Attack, default_loss, fgsm

__all__ = ["RobustTraining", "METHODS"]

METHODS = ("aq", "adml", "trades")
Method = Literal["aq", "adml", "trades"]
Predict = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RobustTraining:
    """How a learner's outer loss is made robust (see the module docstring): `method` "aq", "adml" or
    "trades", with `attack` (default FGSM from a random start at 8/255), TRADES' weight `beta` (Zhang
    et al.'s 6 by default) and the `seed` of the attack's random starts."""

    method: Method
    attack: Attack = fgsm(8 / 255, random_start=True)
    beta: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.attack, Attack):
            raise ValueError(f"attack must be a fastadapt.robust.Attack (fgsm(...), pgd(...)), got {self.attack!r}")
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)
                                                and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")

    # -- the pieces -------------------------------------------------------------------------------
    def generator(self, x: Tensor) -> torch.Generator:
        """The random-start stream for inputs `x`: from `seed` and `x`'s bytes (the same inputs, the
        same stream). Reads `x`'s values, so it runs task by task, not under `torch.func.vmap`."""
        if under_vmap():
            raise ValueError("robust training attacks task by task; it cannot run under torch.func.vmap "
                             "(execution='vmap'): use execution='auto' or 'loop'")
        digest = zlib.crc32(x.detach().cpu().contiguous().numpy().tobytes())
        return torch.Generator().manual_seed(int(np.random.default_rng([self.seed, digest]).integers(2**62)))

    def attacked(self, predict: Predict, x: Tensor, y: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = default_loss) -> Tensor:
        """`x` attacked to raise `loss_fn(predict(x), y)`; detached."""
        return self.attack(predict, x, y, loss_fn=loss_fn, generator=self.generator(x))

    def trades_term(self, predict: Predict, x: Tensor, attack_predict: Predict | None = None) -> Tensor:
        """`beta` times the KL divergence from the clean predictions on `x` to those on `x` attacked
        to maximise it (`attack_predict`, default `predict`, is what the attacker differentiates:
        the same function with constant parameters)."""
        clean = predict(x)
        target = F.softmax(clean.detach(), -1)
        adversarial = self.attack.perturb(lambda z: _kl(attack_predict or predict, z, target), x,
                                          generator=self.generator(x))
        return self.beta * _kl(predict, adversarial, F.softmax(clean, -1))

    # -- the learners -----------------------------------------------------------------------------
    def seams(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] = default_loss
              ) -> dict[str, Callable]:
        """The seams of a gradient-based learner over `model` (`GradientLearner(..., **seams)`),
        acting while `model` is in train mode. `loss_fn`: the loss the attacks raise (the learner's)."""

        def attacked(params: Params, x: Tensor, y: Tensor) -> Tensor:
            if not model.training:
                return x
            return self.attacked(lambda z: forward(model, params, z), x, y, loss_fn)

        def trades(params: Params, x: Tensor, y: Tensor) -> Tensor | float:
            if not model.training:
                return 0.0
            constant = {n: p.detach() for n, p in params.items()}
            return self.trades_term(lambda z: forward(model, params, z), x, lambda z: forward(model, constant, z))

        if self.method == "aq":
            return {"query_hook": attacked}
        if self.method == "adml":
            return {"support_hook": attacked, "query_hook": attacked}
        return {"query_term": trades}

    def episode_loss(self, predict: Predict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The robust outer loss of one episode of a metric learner (Prototypical, Matching
        Networks), whose query predictor is `predict` (the support set held inside it), and the
        outputs its cross-entropy term classified (detached: the attacked queries' for "aq", the
        clean ones' for "trades", as the MAML family's metrics)."""
        if self.method == "aq":
            outputs = predict(self.attacked(predict, x, y))
            return F.cross_entropy(outputs, y), outputs.detach()
        if self.method == "trades":
            outputs = predict(x)
            return F.cross_entropy(outputs, y) + self.trades_term(predict, x), outputs.detach()
        raise ValueError(f"robust training {self.method!r} attacks an inner loop's support set; metric learners "
                         "have none: use 'aq' or 'trades'")


def _kl(predict: Predict, x: Tensor, target: Tensor) -> Tensor:
    """KL(target || softmax(predict(x))), averaged over examples (TRADES' `batchmean`)."""
    return F.kl_div(F.log_softmax(predict(x), -1), target, reduction="batchmean")
