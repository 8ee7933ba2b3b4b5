"""Meta-learning algorithms: the gradient-based family (MAML, FOMAML, Meta-SGD, ANIL) and ProtoNet."""

from .baseline import Baseline
from .gradient import ANIL, FOMAML, MAML, AdaptedModel, GradientLearner, MetaSGD
from .imaml import IMAML
from .mamlpp import MAMLPlusPlus
from .matching import MatchingNet
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["ANIL", "FOMAML", "MAML", "AdaptedModel", "Baseline", "GradientLearner", "IMAML", "MAMLPlusPlus",
           "MatchingNet", "MetaSGD", "ProtoNet", "Reptile"]
