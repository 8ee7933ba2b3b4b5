"""Matching Networks (Vinyals et al. 2016): attention over the support set by cosine similarity.

A query's prediction is the attention-weighted sum of the support set's one-hot labels, the
attention a softmax over the support set of cosine similarities between embeddings; training
minimises the cross-entropy of that distribution (its log is used as logits). The similarity is
the paper's cosine, or (`similarity="scaled-cosine"`) the dot product of the query embedding with
the unit-normalised support embeddings, |f| cos: the query's norm acts as a learned inverse
temperature, as in the public reference implementations (facebookresearch/low-shot-shrink-
hallucinate, easyfsl); a softmax over plain cosines in [-1, 1] stays flat. Optionally with
full context embeddings (FCE): support embeddings g from a bidirectional LSTM over the support
set plus a skip connection, query embeddings f from an attention LSTM that reads the support set
for K processing steps (the paper's appendix, eqs. 3-6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import add_gradients, forward, loss_with_grads
from .base import EpisodePredictor, Learner

if TYPE_CHECKING:
    from ..robust.training import RobustTraining

__all__ = ["FullContextEmbedding", "MatchingNet", "Similarity", "cosine_attention", "matching_log_probs"]

Similarity = Literal["cosine", "scaled-cosine"]


def cosine_attention(query_z: Tensor, support_z: Tensor, similarity: Similarity = "cosine") -> Tensor:
    """Softmax over the support set of cosine similarities: `(M, D), (S, D) -> (M, S)`, rows sum to 1.

    With "scaled-cosine" the query embeddings are not normalised (similarity |q| cos).

    Example:
        >>> a = cosine_attention(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        >>> a.sum(-1), bool(a[0, 0] > a[0, 1])
        (tensor([1.]), True)
    """
    query = F.normalize(query_z, dim=-1) if similarity == "cosine" else query_z
    return (query @ F.normalize(support_z, dim=-1).transpose(-1, -2)).softmax(-1)


def matching_log_probs(attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Log of the attention-weighted one-hot labels, `(M, S) -> (M, ways)`: the logits.

    Example:
        >>> matching_log_probs(torch.tensor([[0.75, 0.25]]), torch.tensor([1, 0]), 2).exp()
        tensor([[0.2500, 0.7500]])
    """
    probs = attention @ F.one_hot(support_y, ways).to(attention.dtype)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class FullContextEmbedding(nn.Module):
    """FCE of Matching Networks: g over the support set, f for each query given g.

    g(x_i, S) = g'(x_i) + forward and backward hidden states of a bidirectional LSTM run over the
    support embeddings g'(x_i) (in the order given). f(x, S) = h_K of an attention LSTM started at
    h_0 = f'(x), c_0 = 0: step k reads r = sum_i softmax_i(h_{k-1} . g_i) g_i, runs the LSTM cell on
    input [f'(x), r] with state (h_{k-1}, c_{k-1}) and adds the skip connection, h_k = h + f'(x).
    The read is a weighted sum over the support set, so f does not depend on its order.

    Example:
        >>> fce = FullContextEmbedding(8, steps=3)
        >>> g = fce.embed_support(torch.rand(5, 8))
        >>> fce.embed_query(torch.rand(4, 8), g).shape
        torch.Size([4, 8])
    """

    def __init__(self, dim: int, steps: int = 5) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer (the embedding size), got {dim!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps (FCE processing steps K) must be an integer >= 1, got {steps!r}")
        self.dim, self.steps = dim, steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def embed_support(self, support_z: Tensor) -> Tensor:
        """g: `(S, D) -> (S, D)`, each embedding in the context of the whole (ordered) support set."""
        states, _ = self.support_lstm(support_z.unsqueeze(0))
        forward_h, backward_h = states.squeeze(0).split(self.dim, dim=-1)
        return support_z + forward_h + backward_h

    def embed_query(self, query_z: Tensor, support_g: Tensor) -> Tensor:
        """f: `(M, D)` query embeddings and `(S, D)` support embeddings g -> `(M, D)`."""
        h, c = query_z, torch.zeros_like(query_z)
        for _ in range(self.steps):
            read = (h @ support_g.T).softmax(-1) @ support_g
            h, c = self.query_cell(torch.cat([query_z, read], -1), (h, c))
            h = h + query_z
        return h


class MatchingNet(Learner):
    """Matching Networks over any embedding `encoder` (e.g. Conv4 without head).

    Support and query images of an episode are embedded in one forward pass, so BatchNorm sees
    the episode's statistics (transductive, like `ProtoNet` and MAML). Logits are log-probabilities.

    Args:
        encoder: maps `(B, ...)` inputs to embeddings (flattened to `(B, D)`).
        fce: use full context embeddings (`FullContextEmbedding`).
        fce_steps: K, the attention LSTM's processing steps.
        embedding_dim: D, needed with `fce`; by default the encoder's `embedding_dim` attribute.
        similarity: "cosine" (the paper) or "scaled-cosine" (the reference implementations).
        robust: a `robust.RobustTraining` ("aq" or "trades"): each episode's training loss on
            attacked queries.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> net = MatchingNet(Conv4.omniglot(ways=None), fce=True)
        >>> log_probs = net.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))(torch.rand(3, 1, 28, 28))
        >>> log_probs.shape, torch.allclose(log_probs.exp().sum(-1), torch.ones(3))
        (torch.Size([3, 5]), True)
    """

    task = "classification"

    def __init__(self, encoder: nn.Module, fce: bool = False, fce_steps: int = 5,
                 embedding_dim: int | None = None, similarity: Similarity = "cosine",
                 robust: RobustTraining | None = None) -> None:
        super().__init__()
        if robust is not None and robust.method not in ("aq", "trades"):
            raise ValueError(f"robust training of Matching Networks: 'aq' or 'trades', got {robust.method!r}")
        self.robust = robust
        if similarity not in ("cosine", "scaled-cosine"):
            raise ValueError(f"similarity must be 'cosine' or 'scaled-cosine', got {similarity!r}")
        self.encoder = encoder
        self.similarity: Similarity = similarity
        self.fce: FullContextEmbedding | None = None
        if fce:
            dim = embedding_dim if embedding_dim is not None else getattr(encoder, "embedding_dim", None)
            if dim is None:
                raise ValueError("fce=True needs the embedding size: pass embedding_dim= (this encoder has no "
                                 "`embedding_dim` attribute)")
            self.fce = FullContextEmbedding(dim, fce_steps)

    def embed(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Support embeddings g `(S, D)` and query embeddings f `(M, D)` of one episode (FCE applied)."""
        z = forward(self.encoder, dict(self.encoder.named_parameters()), torch.cat([support_x, query_x])).flatten(1)
        support_z, query_z = z[: support_x.shape[0]], z[support_x.shape[0]:]
        if self.fce is None:
            return support_z, query_z
        support_g = self.fce.embed_support(support_z)
        return support_g, self.fce.embed_query(query_z, support_g)

    def attention(self, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Attention of each query over the support set, `(M, S)`; every row sums to 1."""
        support_g, query_f = self.embed(support_x, query_x)
        return cosine_attention(query_f, support_g, self.similarity)

    def episode_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query log-probabilities `(M, ways)`, ways = largest support label + 1."""
        return matching_log_probs(self.attention(support_x, query_x), support_y, int(support_y.max()) + 1)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> EpisodePredictor:
        """Returns a predictor for the episode whose support set is given (nothing is trained)."""
        return EpisodePredictor(self.encoder, self.episode_logits, support_x, support_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query cross-entropy over the batch, and metrics (means over tasks).

        Each episode is back-propagated as soon as its loss exists (one episode's graph alive at a
        time, `functional.taskwise`); `loss.backward()` deposits the mean gradient.
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        taskwise = torch.is_grad_enabled() and bool(trainable)
        total, losses, all_logits = None, [], []
        for t in range(len(batch)):
            ep = batch[t]
            if self.robust is not None and self.training and taskwise:
                loss, logits = self.robust.episode_loss(
                    lambda q, ep=ep: self.episode_logits(ep.support_x, ep.support_y, q), ep.query_x, ep.query_y)
            else:
                logits = self.episode_logits(ep.support_x, ep.support_y, ep.query_x)
                loss = F.cross_entropy(logits, ep.query_y)
            if taskwise:
                total = add_gradients(total, torch.autograd.grad(loss / len(batch), trainable, materialize_grads=True))
            losses.append(loss.detach() if taskwise else loss)
            all_logits.append(logits.detach())
        metrics = {k: v.mean() for k, v in _metrics(torch.stack(all_logits), batch.query_y).items()}
        mean_loss = torch.stack(losses).mean()
        return (loss_with_grads(mean_loss, trainable, total) if taskwise else mean_loss), metrics

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """(`inner_steps` is ignored: no inner loop.)"""
        return _metrics(self._query_outputs(batch, None), batch.query_y)

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """Every episode's query log-probabilities (`inner_steps` is ignored)."""
        return torch.stack([self.episode_logits(batch.support_x[t], batch.support_y[t], batch.query_x[t])
                            for t in range(len(batch))])


def _metrics(logits: Tensor, query_y: Tensor) -> dict[str, Tensor]:
    return {
        "loss": F.cross_entropy(logits.transpose(1, 2), query_y, reduction="none").mean(1),
        "accuracy": (logits.argmax(-1) == query_y).float().mean(1),
    }
