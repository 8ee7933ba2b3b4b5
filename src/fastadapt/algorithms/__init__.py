"""Meta-learning algorithms: the gradient-based family (MAML, FOMAML, Meta-SGD, ANIL) and ProtoNet."""

from .gradient import ANIL, FOMAML, MAML, AdaptedModel, GradientLearner, MetaSGD
from .protonet import ProtoNet

__all__ = ["ANIL", "FOMAML", "MAML", "AdaptedModel", "GradientLearner", "MetaSGD", "ProtoNet"]
