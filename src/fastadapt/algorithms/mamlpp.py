"""MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML"): MAML with its fixes on.

`MAMLPlusPlus` is `GradientLearner` with the MAML++ options switched on by default:

- LSLR: learned inner rates per parameter tensor and per step (`per_step_inner_lr`);
- MSL: the multi-step loss, annealed to the last step (`multi_step_loss_iterations`);
- BNWB: per-step BatchNorm weights and biases (`per_step_bn_weights`, where the model has BatchNorm);
- BNRS: per-step BatchNorm running statistics (`per_step_bn_statistics`, off by default: see
  `functional.step_norm` and docs/methods/maml-plus-plus.md for why);
- DA: derivative-order annealing (`first_order_iterations`, 0 by default, as the released configs);
- the cosine outer learning-rate schedule is the trainer's (`schedule: cosine`, `min_meta_lr`).

Defaults follow the authors' released Omniglot configs (HowToTrainYourMAMLPytorch,
experiment_template_config/omniglot_maml++.json and script_generation_tools/generate_configs.py):
5 inner steps, initial inner rate 0.1, multi-step loss over the first 10 of 100 epochs of 500
iterations (5000 iterations), second order from the start (`first_order_to_second_order_epoch: -1`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..functional.step_norm import batch_norm_layers
from .gradient import GradientLearner

__all__ = ["MAMLPlusPlus"]

# 10 epochs x 500 iterations: `multi_step_loss_num_epochs` and `total_iter_per_epoch` of the released configs.
MSL_ITERATIONS = 5000


class MAMLPlusPlus(GradientLearner):
    """MAML++: MAML with per-step learned rates, multi-step loss and per-step BatchNorm weights.

    `per_step_bn_weights=None` turns them on exactly when the model has BatchNorm layers. Every
    other `GradientLearner` option (e.g. `inner_optimizer`, `first_order_iterations`) passes through.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> learner = MAMLPlusPlus(Conv4.omniglot(ways=5))
        >>> learner.inner_steps, learner.step_weights()
        (5, [0.2, 0.2, 0.2, 0.2, 0.2])
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 per_step_inner_lr: bool = True, multi_step_loss_iterations: int = MSL_ITERATIONS,
                 per_step_bn_weights: bool | None = None, **options: Any) -> None:
        if per_step_bn_weights is None:
            per_step_bn_weights = bool(batch_norm_layers(model))
        super().__init__(model, inner_lr, inner_steps, per_step_inner_lr=per_step_inner_lr,
                         multi_step_loss_iterations=multi_step_loss_iterations,
                         per_step_bn_weights=per_step_bn_weights, **options)
