"""Prototypical Networks (Snell et al. 2017): classify by squared Euclidean distance to class means."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import add_gradients, forward, loss_with_grads, mixed_precision
from ..functional.fold import can_fold, fold_call
from .base import EpisodePredictor, Learner

if TYPE_CHECKING:
    from ..robust.training import RobustTraining

__all__ = ["ProtoNet", "prototypes", "proto_logits", "AGGREGATIONS"]

# how a class's support embeddings make its prototype: the mean (Snell et al.), or robust to noisy
# labels: the per-coordinate median, the mean without the highest and lowest fifth per coordinate,
# or a mean weighted by closeness to the class median (softmax of minus the squared distance over
# its mean)
AGGREGATIONS = ("mean", "median", "trimmed-mean", "weighted")
_TRIM = 0.2


def prototypes(support_z: Tensor, support_y: Tensor, ways: int, aggregation: str = "mean") -> Tensor:
    """One embedding per class, `(..., N*K, D)` with labels 0..ways-1 -> `(..., ways, D)`: the mean of
    its support embeddings, or a robust `aggregation` (`AGGREGATIONS`). With one shot per class every
    aggregation is that shot's embedding.

    Example:
        >>> import torch
        >>> prototypes(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1.],
                [5.]])
        >>> prototypes(torch.tensor([[0.0], [1.0], [9.0], [5.0]]), torch.tensor([0, 0, 0, 1]), 2, "median")
        tensor([[1.],
                [5.]])
    """
    if aggregation == "mean":
        one_hot = F.one_hot(support_y, ways).to(support_z.dtype)  # (..., NK, ways)
        sums = one_hot.transpose(-1, -2) @ support_z
        return sums / one_hot.sum(-2).unsqueeze(-1)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if support_z.dim() > 2:  # task stacks: one task at a time
        return torch.stack([prototypes(z, y, ways, aggregation) for z, y in zip(support_z, support_y)])
    return torch.stack([_robust_centre(support_z[support_y == c], aggregation) for c in range(ways)])


def _robust_centre(members: Tensor, aggregation: str) -> Tensor:
    """A robust centre `(D,)` of one class's embeddings `(k, D)`."""
    if aggregation == "median":
        return members.quantile(0.5, dim=0)  # the middle pair's mean for an even count
    if aggregation == "trimmed-mean":
        cut = int(_TRIM * len(members))
        return members.sort(0).values[cut:len(members) - cut].mean(0)
    distances = (members - _robust_centre(members, "median")).pow(2).sum(-1)
    weights = torch.softmax(-distances / distances.mean().clamp_min(1e-12), 0)
    return weights @ members


def proto_logits(query_z: Tensor, protos: Tensor) -> Tensor:
    """Negative squared Euclidean distances `(..., M, ways)`: the logits."""
    return -(query_z.unsqueeze(-2) - protos.unsqueeze(-3)).pow(2).sum(-1)


class ProtoNet(Learner):
    """Prototypical Networks over any embedding `encoder`.

    `aggregation` makes a class's prototype from its support embeddings: "mean" (the paper) or, for
    support sets with noisy labels, "median", "trimmed-mean" or "weighted" (`prototypes`).
    Each episode's support and query images are embedded in one forward pass, so BatchNorm sees
    the episode's statistics (transductive, as in the reference implementation and in MAML).
    `precision="bf16"` embeds under CPU bf16 autocast (weights and gradients stay float32).
    With `fold=True` all episodes of a `TaskBatch` go through the encoder as one large batch (with
    per-episode BatchNorm statistics, `functional.fold`): exact, but measured 3-4x slower than the
    default per-episode loop on 2 CPU cores (benchmarks/protonet_fold.py), so it is opt-in.
    `robust` (a `robust.RobustTraining`, "aq" or "trades"): the training loss of each episode on
    attacked queries (not with `fold`).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> net = ProtoNet(Conv4.omniglot(ways=None))
        >>> net.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    task = "classification"

    def __init__(self, encoder: nn.Module, fold: bool = False, precision: str = "fp32", aggregation: str = "mean",
                 robust: RobustTraining | None = None) -> None:
        super().__init__()
        if robust is not None and (fold or robust.method not in ("aq", "trades")):
            raise ValueError(f"robust training of Prototypical Networks: 'aq' or 'trades', episode by episode (not "
                             f"fold=True); got method {robust.method!r}{' with fold=True' if fold else ''}")
        self.robust = robust
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation = aggregation
        if fold and not can_fold(encoder):
            raise ValueError("fold=True needs an encoder of per-example layers and BatchNorm without running "
                             "statistics (functional.fold.can_fold); this encoder has other layers")
        self.encoder = encoder
        self.fold = fold
        self.precision = precision

    def _embed(self, x: Tensor) -> Tensor:
        with mixed_precision(torch.bfloat16 if self.precision == "bf16" else None):
            z = forward(self.encoder, dict(self.encoder.named_parameters()), x).flatten(1)
        return z.float() if z.dtype == torch.bfloat16 else z

    def _episode_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        ways = int(support_y.max()) + 1
        z = self._embed(torch.cat([support_x, query_x]))
        n = support_x.shape[0]
        return proto_logits(z[n:], prototypes(z[:n], support_y, ways, self.aggregation))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> EpisodePredictor:
        """Returns a predictor for the episode whose support set is given."""
        return EpisodePredictor(self.encoder, self._episode_logits, support_x, support_y)

    def batch_logits(self, batch: TaskBatch) -> Tensor:
        """Query logits of every episode, `(T, N*Q, ways)`."""
        if not self.fold:
            episodes = (batch[t] for t in range(len(batch)))
            return torch.stack([self._episode_logits(ep.support_x, ep.support_y, ep.query_x) for ep in episodes])
        n = batch.support_x.shape[1]
        z = fold_call(self.encoder, torch.cat([batch.support_x, batch.query_x], 1)).flatten(2)
        ways = int(batch.support_y.max()) + 1
        return proto_logits(z[:, n:], prototypes(z[:, :n], batch.support_y, ways, self.aggregation))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query cross-entropy over the batch, and metrics (means over tasks).

        Without `fold`, each episode is back-propagated as soon as its loss exists (only one
        episode's graph alive, `functional.taskwise`); `loss.backward()` deposits the sum.
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.fold or not torch.is_grad_enabled() or not trainable:
            logits = self.batch_logits(batch)
            metrics = {k: v.mean() for k, v in self._metrics(logits, batch.query_y).items()}
            return F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten()), metrics
        total, losses, all_logits = None, [], []
        for t in range(len(batch)):
            ep = batch[t]
            logits, loss = self._episode_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y)
            grads = torch.autograd.grad(loss / len(batch), trainable, materialize_grads=True)
            total = add_gradients(total, grads)
            losses.append(loss.detach())
            all_logits.append(logits.detach())
        metrics = {k: v.mean() for k, v in self._metrics(torch.stack(all_logits), batch.query_y).items()}
        return loss_with_grads(torch.stack(losses).mean(), trainable, total), metrics

    def _episode_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """One episode's query logits and its training loss (robust in train mode with `robust`:
        the logits of the queries its loss classified, `RobustTraining.episode_loss`)."""
        if self.robust is None or not self.training:
            logits = self._episode_logits(support_x, support_y, query_x)
            return logits, F.cross_entropy(logits, query_y)
        loss, logits = self.robust.episode_loss(lambda q: self._episode_logits(support_x, support_y, q), query_x,
                                                query_y)
        return logits, loss

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """(`inner_steps` is ignored: no inner loop.)"""
        return self._metrics(self.batch_logits(batch), batch.query_y)

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """Every episode's query logits (`inner_steps` is ignored)."""
        return self.batch_logits(batch)

    def _metrics(self, logits: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        logits = logits.detach()
        return {
            "loss": F.cross_entropy(logits.transpose(1, 2), query_y, reduction="none").mean(1),
            "accuracy": (logits.argmax(-1) == query_y).float().mean(1),
        }
