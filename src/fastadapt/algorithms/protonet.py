"""Prototypical Networks (Snell et al. 2017): classify by squared Euclidean distance to class means."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from .objectives import task_metrics

__all__ = ["ProtoNet", "prototypes", "proto_logits"]


def prototypes(support_z: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Mean embedding per class: `(..., N*K, D)` with labels 0..ways-1 -> `(..., ways, D)`.

    Example:
        >>> import torch
        >>> prototypes(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1.],
                [5.]])
    """
    one_hot = F.one_hot(support_y, ways).to(support_z.dtype)  # (..., NK, ways)
    sums = one_hot.transpose(-1, -2) @ support_z
    return sums / one_hot.sum(-2).unsqueeze(-1)


def proto_logits(query_z: Tensor, protos: Tensor) -> Tensor:
    """Negative squared Euclidean distances `(..., M, ways)`: the logits."""
    return -(query_z.unsqueeze(-2) - protos.unsqueeze(-3)).pow(2).sum(-1)


class _ProtoPredictor:
    """`learner(query_x)` for one adapted episode: embeds the query beside the support set."""

    def __init__(self, net: "ProtoNet", support_x: Tensor, support_y: Tensor) -> None:
        self.net, self.support_x, self.support_y = net, support_x, support_y

    def __call__(self, query_x: Tensor) -> Tensor:
        return self.net._episode_logits(self.support_x, self.support_y, query_x)


class ProtoNet(nn.Module):
    """Prototypical Networks over any embedding `encoder`.

    Each episode's support and query images are embedded in one forward pass, so BatchNorm sees
    the episode's statistics (transductive, as in the reference implementation and in MAML).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> net = ProtoNet(Conv4.omniglot(ways=None))
        >>> net.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    task = "classification"

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def _episode_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        ways = int(support_y.max()) + 1
        z = self.encoder(torch.cat([support_x, query_x])).flatten(1)
        n = support_x.shape[0]
        return proto_logits(z[n:], prototypes(z[:n], support_y, ways))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> _ProtoPredictor:
        """Returns a predictor for the episode whose support set is given."""
        return _ProtoPredictor(self, support_x, support_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query cross-entropy over the batch, and metrics (means over tasks)."""
        losses, rows = [], []
        for t in range(len(batch)):
            ep = batch[t]
            logits = self._episode_logits(ep.support_x, ep.support_y, ep.query_x)
            losses.append(F.cross_entropy(logits, ep.query_y))
            rows.append(task_metrics(self.task, logits, ep.query_y))
        return torch.stack(losses).mean(), {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}

    @torch.no_grad()
    def task_metrics(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task `loss` and `accuracy`, `(T,)` tensors (`inner_steps` is ignored: no inner loop)."""
        rows = [
            task_metrics(self.task, self._episode_logits(ep.support_x, ep.support_y, ep.query_x), ep.query_y)
            for ep in (batch[t] for t in range(len(batch)))
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
