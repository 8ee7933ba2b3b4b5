"""Meta-learning algorithms, each a `Learner`: the gradient-based family (MAML, FOMAML, Meta-SGD,
ANIL, MAML++), iMAML, Reptile, ProtoNet, Matching Networks and Baseline."""

from .base import AdaptedModel, Learner
from .baseline import Baseline
from .gradient import ANIL, FOMAML, MAML, GradientLearner, MetaSGD
from .imaml import IMAML
from .mamlpp import MAMLPlusPlus
from .matching import MatchingNet
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["ANIL", "FOMAML", "MAML", "AdaptedModel", "Baseline", "GradientLearner", "IMAML", "Learner", "MAMLPlusPlus",
           "MatchingNet", "MetaSGD", "ProtoNet", "Reptile"]
