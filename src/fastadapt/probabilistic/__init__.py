"""Probabilistic meta-learning: learners that predict by several weight samples or particles.

- `VAMPIRE`: a meta-learned Gaussian prior over the weights, a variational posterior per task
  (VAMPIRE / ABML style);
- `PLATIPUS`: a learned distribution over initialisations, sampled per task, then MAML;
- `BMAML`: SVGD particles and the chaser loss;
- `gaussian`, `svgd`, `sampling`: the pieces (KL of diagonal Gaussians, Stein variational
  gradient descent as an inner optimizer, explicit draws).

Deep ensembles need no learner of their own: `fastadapt eval RUN --members RUN2 RUN3 ...`
averages independently trained runs (`training.evaluate.evaluate_calibration`).
"""

from .base import SampledPredictor, SamplingLearner
from .bmaml import BMAML
from .gaussian import kl_divergence, reparameterised
from .platipus import PLATIPUS
from .svgd import rbf_kernel, svgd, svgd_direction
from .vampire import VAMPIRE

__all__ = ["BMAML", "PLATIPUS", "VAMPIRE", "SampledPredictor", "SamplingLearner", "kl_divergence", "reparameterised",
           "rbf_kernel", "svgd", "svgd_direction"]
