"""Robustness of meta-learned models: attacks on functions of the input (FGSM, PGD in L-inf and L2
balls) and evaluation of every learner under attack after adaptation.

Example:
    >>> attack = pgd(8 / 255, steps=10)
    >>> attack.norm, attack.steps, round(attack.alpha, 5)
    ('linf', 10, 0.00784)
"""

from .attacks import Attack, default_loss, fgsm, pgd
from .evaluation import attack_generator, attacked_task_metrics, evaluate_under_attack

__all__ = ["Attack", "attack_generator", "attacked_task_metrics", "default_loss", "evaluate_under_attack", "fgsm",
           "pgd"]
