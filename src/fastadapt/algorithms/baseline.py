"""Baseline and Baseline++ (Chen, Liu, Kira, Wang and Huang 2019, "A Closer Look at Few-shot Classification").

Pre-training is plain supervised learning: the backbone and a global head over all meta-training
classes, cross-entropy on batches with global labels (`data.ClassBatchSampler`). For each test
episode the backbone is frozen and a NEW head is fitted on the support embeddings, then scores the
query set. The head is linear (Baseline) or cosine (Baseline++: `scale * cos(z, w_c)`, class
vectors normalised to unit length).

Fine-tuning follows the authors' code (methods/baselinefinetune.py): 100 epochs over the support
set in shuffled mini-batches of 4, SGD with lr 0.01, momentum 0.9, dampening 0.9 and weight decay
1e-3, the head initialised as `nn.Linear` initialises. Embeddings come from the backbone in eval
mode (BatchNorm with running statistics, as their feature extraction does). Every episode's
fine-tuning draws its initialisation and shuffling from a generator seeded with `finetune_seed`,
so an evaluated episode is a pure function of itself, and all tasks of a `TaskBatch` are fitted
at once (batched matrix products), with the same result as one by one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import adapt, add_decayed_weights, chain, scale_by_lr, trace
from .base import Learner, module_mode

__all__ = ["Baseline", "CosineHead", "cosine_logits", "default_scale"]

HeadKind = Literal["linear", "cosine"]


def default_scale(classes: int) -> float:
    """The cosine head's scale in Chen et al.'s code: 2 up to 200 classes, 10 above (Omniglot's 4800).

    Example:
        >>> default_scale(5), default_scale(4800)
        (2.0, 10.0)
    """
    return 2.0 if classes <= 200 else 10.0


def cosine_logits(z: Tensor, weight: Tensor, scale: Tensor | float) -> Tensor:
    """`scale * cos(z_i, w_c)`: embeddings `(..., M, D)` and class vectors `(..., C, D)` -> `(..., M, C)`.

    Example:
        >>> cosine_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 2.0)
        tensor([[1.2000, 1.6000]])
    """
    return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)


class CosineHead(nn.Module):
    """Baseline++'s classifier: `scale * cos(z, w_c)` with weight-normalised class vectors.

    `scale` is fixed (a buffer) or, with `learn_scale`, a learned parameter starting there.

    Example:
        >>> head = CosineHead(4, 3, scale=10.0)
        >>> bool(head(torch.rand(2, 4)).abs().max() <= 10.0)
        True
    """

    def __init__(self, in_features: int, classes: int, scale: float | None = None, learn_scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear initialises its weight
        value = torch.tensor(float(scale if scale is not None else default_scale(classes)))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, z: Tensor) -> Tensor:
        return cosine_logits(z, self.weight, self.scale)


class _FineTuned(nn.Module):
    """`predictor(query_x)`: the frozen backbone's embeddings (eval mode) through one episode's fitted head."""

    def __init__(self, net: Baseline, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.__dict__["net"] = net  # not a submodule: the predictor holds no parameters of its own
        self.weight, self.bias = weight, bias

    def forward(self, query_x: Tensor) -> Tensor:
        return self.net.head_logits(self.net.embed(query_x, graph=True), self.weight, self.bias)


class Baseline(Learner):
    """Pre-train a backbone with a global head; per episode, fit a new head on frozen embeddings.

    Args:
        encoder: the backbone, mapping images to embeddings (e.g. `Conv4.omniglot(ways=None,
            track_running_stats=True)`).
        num_classes: classes of the pre-training head (all meta-training classes).
        head: "linear" (Baseline) or "cosine" (Baseline++).
        embedding_dim: the encoder's output size (default: its `embedding_dim` attribute).
        scale: the cosine heads' scale (default: `default_scale` of each head's class count).
        learn_scale: learn the pre-training cosine head's scale (the fitted heads keep theirs fixed).
        finetune_epochs, finetune_batch, finetune_lr, momentum, dampening, weight_decay: the
            per-episode SGD (defaults: the authors' code).
        finetune_seed: seed of every episode's head initialisation and shuffling.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), num_classes=100, finetune_epochs=2)
        >>> net.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    task = "classification"

    def __init__(self, encoder: nn.Module, num_classes: int, *, head: HeadKind = "linear",
                 embedding_dim: int | None = None, scale: float | None = None, learn_scale: bool = False,
                 finetune_epochs: int = 100, finetune_batch: int = 4, finetune_lr: float = 0.01,
                 momentum: float = 0.9, dampening: float = 0.9, weight_decay: float = 1e-3,
                 finetune_seed: int = 0) -> None:
        super().__init__()
        if head not in ("linear", "cosine"):
            raise ValueError(f"head must be 'linear' (Baseline) or 'cosine' (Baseline++), got {head!r}")
        for name, value in (("num_classes", num_classes), ("finetune_epochs", finetune_epochs),
                            ("finetune_batch", finetune_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {finetune_lr!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0 (or None for the authors' default), got {scale!r}")
        embedding_dim = embedding_dim if embedding_dim is not None else getattr(encoder, "embedding_dim", None)
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError("embedding_dim is needed: pass embedding_dim=, the size of the encoder's output "
                             f"(the encoder has no int attribute embedding_dim; got {embedding_dim!r})")
        self.encoder = encoder
        self.num_classes = num_classes
        self.head_kind: HeadKind = head
        self.scale = scale
        self.head: nn.Module = (CosineHead(embedding_dim, num_classes, scale, learn_scale) if head == "cosine"
                                else nn.Linear(embedding_dim, num_classes))
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.bias)  # as the authors' BaselineTrain
        self.finetune_epochs, self.finetune_batch, self.finetune_lr = finetune_epochs, finetune_batch, float(finetune_lr)
        self.momentum, self.dampening, self.weight_decay = float(momentum), float(dampening), float(weight_decay)
        self.finetune_seed = finetune_seed

    # -- pre-training -------------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Supervised cross-entropy of the global head on every example of `batch` (support and
        query), whose labels must be global class labels (`data.ClassBatchSampler`)."""
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        y = torch.cat([batch.support_y.flatten(), batch.query_y.flatten()])
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"Baseline pre-training needs global labels in 0..{self.num_classes - 1}, got labels "
                             f"{int(y.min())}..{int(y.max())}; draw batches with data.ClassBatchSampler")
        logits = self.head(self.encoder(x).flatten(1))
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "accuracy": (logits.detach().argmax(-1) == y).float().mean()}

    # -- fine-tuning --------------------------------------------------------------------------
    def embed(self, x: Tensor, graph: bool = False) -> Tensor:
        """Frozen-backbone embeddings `(N, D)` (eval mode; no graph unless `graph`, which keeps the
        one grad mode gives: a predictor differentiable in its input, for an attack)."""
        with module_mode(self.encoder, training=False), torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            return self.encoder(x).flatten(1)

    def head_logits(self, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Logits of fitted heads: `z (..., M, D)`, `weight (..., C, D)`, `bias (..., C)` or None."""
        if self.head_kind == "cosine":
            return cosine_logits(z, weight, self.scale if self.scale is not None else default_scale(weight.shape[-2]))
        return z @ weight.transpose(-1, -2) + bias.unsqueeze(-2)  # type: ignore[union-attr]

    def fit_heads(self, z: Tensor, y: Tensor, ways: int) -> tuple[Tensor, Tensor | None]:
        """New heads for T tasks at once, fitted on support embeddings `z (T, N, D)`, labels `y (T, N)`
        (differentiable w.r.t. `z` when it requires grad: the fine-tuning steps keep their graph).

        Returns `weight (T, ways, D)` and `bias (T, ways)` (None for the cosine head).
        """
        tasks, n, d = z.shape
        generator = torch.Generator().manual_seed(self.finetune_seed)
        bound = 1 / math.sqrt(d)  # nn.Linear's initialisation: U(-1/sqrt(d), 1/sqrt(d))
        weight = ((torch.rand(ways, d, generator=generator, dtype=z.dtype) * 2 - 1) * bound).to(z.device)
        start = {"weight": weight.expand(tasks, -1, -1)}
        if self.head_kind == "linear":
            bias = ((torch.rand(ways, generator=generator, dtype=z.dtype) * 2 - 1) * bound).to(z.device)
            start["bias"] = bias.expand(tasks, -1)
        orders = torch.rand(self.finetune_epochs, n, generator=generator).argsort(dim=1)  # a shuffle per epoch
        chunks = [chunk for order in orders for chunk in order.split(self.finetune_batch)]

        def chunk_loss(head: dict[str, Tensor], step: int) -> Tensor:
            """The sum over tasks of each task's mean loss on mini-batch `step`: each task its own gradient."""
            chunk = chunks[step]
            logits = self.head_logits(z[:, chunk], head["weight"], head.get("bias"))
            return F.cross_entropy(logits.flatten(0, 1), y[:, chunk].flatten(), reduction="sum") / len(chunk)

        # torch.optim.SGD's update: coupled weight decay, momentum with dampening
        optimizer = chain(add_decayed_weights(self.weight_decay), trace(self.momentum, dampening=self.dampening),
                          scale_by_lr(self.finetune_lr))
        head = adapt(chunk_loss, start, optimizer=optimizer, steps=len(chunks), keep_graph=z.requires_grad).points[-1]
        return head["weight"], head.get("bias")

    def adapt(self, support_x: Tensor, support_y: Tensor) -> _FineTuned:
        """Fits a new head on the support set's frozen embeddings; returns the query predictor
        (differentiable w.r.t. `support_x` when it requires grad)."""
        ways = int(support_y.max()) + 1
        weight, bias = self.fit_heads(self.embed(support_x, graph=support_x.requires_grad)[None], support_y[None], ways)
        return _FineTuned(self, weight[0], None if bias is None else bias[0])

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """(`inner_steps` is ignored: the fine-tuning schedule is `finetune_epochs`.)"""
        logits = self._query_outputs(batch, None)
        return {
            "loss": F.cross_entropy(logits.transpose(1, 2), batch.query_y, reduction="none").mean(1),
            "accuracy": (logits.argmax(-1) == batch.query_y).float().mean(1),
        }

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """Every episode's query logits from its own fitted head."""
        ways = int(batch.support_y.max()) + 1
        weight, bias = self.fit_heads(self._embed_tasks(batch.support_x), batch.support_y, ways)
        return self.head_logits(self._embed_tasks(batch.query_x), weight, bias)

    def _embed_tasks(self, x: Tensor) -> Tensor:
        """Embeddings `(T, N, D)` of T tasks' inputs `(T, N, ...)`: in one forward where examples do not
        see each other, task by task where BatchNorm normalises by batch statistics (each task by its
        own, as `adapt` does)."""
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in self.encoder.modules()):
            return torch.stack([self.embed(task) for task in x])
        return self.embed(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1))
