"""Robustness of meta-learned models: attacks on functions of the input (FGSM, PGD in L-inf and L2
balls) and every learner's metrics with the attacker on the queries after adaptation, on the
support set through adaptation (poisoning) or both (over fixed episodes:
`fastadapt.training.evaluate_under_attack`; of a run directory: `fastadapt.robust.evaluate`);
input corruptions on the support set, the query set or both (`corrupt`, `corrupted_batch`,
`training.evaluate_corrupted`); label noise in support sets (`NoisyLabels`, a task source); robust meta-training (`RobustTraining`:
adversarial querying, ADML-style, TRADES-style).

Example:
    >>> attack = pgd(8 / 255, steps=10)
    >>> attack.norm, attack.steps, round(attack.alpha, 5)
    ('linf', 10, 0.00784)
"""

from .attacks import Attack, default_loss, fgsm, pgd
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupted_batch
from .evaluation import attack_generator, attacked_task_metrics
from .label_noise import NOISE_KINDS, NoisyLabels, noisy_per_class
from .training import METHODS, RobustTraining

__all__ = ["Attack", "CORRUPTIONS", "METHODS", "NOISE_KINDS", "NoisyLabels", "RobustTraining", "SEVERITIES",
           "attack_generator", "noisy_per_class", "attacked_task_metrics", "corrupt", "corrupted_batch", "default_loss",
           "evaluate", "fgsm", "pgd"]


def __getattr__(name: str):
    """`fastadapt.robust.evaluate`: the run-directory evaluation of the API floor (`fastadapt.api`),
    looked up when first used (this package sits below the API and imports nothing from it)."""
    if name == "evaluate":
        from ..api import evaluate_robustness

        return evaluate_robustness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
