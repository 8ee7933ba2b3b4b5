"""fastadapt: meta-learning for PyTorch on a task-vectorised functional engine.

Example:
    >>> import fastadapt
    >>> from fastadapt.nn import Conv4
    >>> maml = fastadapt.MAML(Conv4.omniglot(ways=5), inner_lr=0.4, inner_steps=1)
"""

__version__ = "0.1.0"

from .algorithms import (ANIL, FOMAML, IMAML, MAML, Baseline, GradientLearner, Learner, MAMLPlusPlus,  # noqa: E402
                         MatchingNet, MetaSGD, ProtoNet, Reptile)
from .api import calibrate, detect_ood, evaluate, evaluate_robustness, load, train  # noqa: E402
from .data import Episode, EpisodeSampler, SinusoidTasks, TaskBatch  # noqa: E402
from .training.config import Config  # noqa: E402

__all__ = [
    "ANIL", "FOMAML", "MAML", "GradientLearner", "MAMLPlusPlus", "MatchingNet", "MetaSGD", "ProtoNet", "Reptile",
    "IMAML", "Baseline", "Learner",
    "Episode", "EpisodeSampler", "SinusoidTasks", "TaskBatch", "Config", "train", "evaluate", "calibrate", "detect_ood", "evaluate_robustness",
    "load", "__version__",
]
