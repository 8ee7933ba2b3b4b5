"""One meta-gradient step per contender, for benchmarks/peers.py.

Every factory takes the contender's own copy of the model and returns `step(batch)`, which adds
the meta-gradient of the mean query loss over the batch to the model's `.grad` (no optimizer
step). Each peer is written the way its documentation or examples write MAML / ProtoNet; peers
are imported lazily so a process only loads the library it runs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fastadapt import MAML, ProtoNet, TaskBatch

Step = Callable[[TaskBatch], None]


# -- MAML / FOMAML ------------------------------------------------------------------------------
def plain_maml(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """Plain torch per-task loop: autograd.grad (create_graph unless first order), then backward."""

    def step(batch: TaskBatch) -> None:
        params = dict(model.named_parameters())
        for t in range(len(batch)):
            p = dict(params)
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, p, (batch.support_x[t],)), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {n: w - inner_lr * g for (n, w), g in zip(p.items(), grads)}
            query = functional_call(model, p, (batch.query_x[t],))
            (F.cross_entropy(query, batch.query_y[t]) / len(batch)).backward()

    return step


def fastadapt_maml(model: nn.Module, inner_lr: float, steps: int, first_order: bool, precision: str = "fp32",
                   task_workers: int = 1) -> Step:
    """fastadapt: `MAML(...).meta_loss(batch)`, then `backward()`."""
    learner = MAML(model, inner_lr, steps, first_order=first_order, precision=precision, task_workers=task_workers)

    def step(batch: TaskBatch) -> None:
        learner.meta_loss(batch)[0].backward()

    return step


def fastadapt_maml_bf16(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """fastadapt's opt-in mixed precision: bf16 autocast, float32 weights and meta-gradients."""
    return fastadapt_maml(model, inner_lr, steps, first_order, precision="bf16")


def fastadapt_maml_workers(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """fastadapt with two task groups at a time in threads (`task_workers=2`, opt-in: more memory)."""
    return fastadapt_maml(model, inner_lr, steps, first_order, task_workers=2)


def fastadapt_maml_workers_bf16(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """`task_workers=2` and bf16 autocast."""
    return fastadapt_maml(model, inner_lr, steps, first_order, precision="bf16", task_workers=2)


def learn2learn_maml(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """learn2learn: per task `maml.clone()`, `adapt(loss)` per step, query loss / T `.backward()`."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            (F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / len(batch)).backward()

    return step


def higher_maml(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """higher: `innerloop_ctx(copy_initial_weights=False)`, `diffopt.step(loss)`, per-task backward.

    First order: `track_higher_grads=False` detaches the fast weights, so (as higher's maintainers
    advise, facebookresearch/higher#63) the query gradient w.r.t. the last fast weights is added
    to the initial weights' `.grad` by hand.
    """
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    weights = list(model.parameters())

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(batch.support_x[t]), batch.support_y[t]))
                loss = F.cross_entropy(fmodel(batch.query_x[t]), batch.query_y[t]) / len(batch)
                if not first_order:
                    loss.backward()
                    continue
                for w, g in zip(weights, torch.autograd.grad(loss, list(fmodel.parameters()))):
                    w.grad = g if w.grad is None else w.grad + g

    return step


def torchopt_maml(model: nn.Module, inner_lr: float, steps: int, first_order: bool) -> Step:
    """TorchOpt. Second order: `MetaSGD` with `extract_state_dict` / `recover_state_dict` per task
    (their MAML Omniglot example; the query loss is back-propagated per task like the others).
    First order: MetaSGD always differentiates through its steps, so the functional API
    (`torchopt.sgd`, `apply_updates`) runs on inner gradients taken without a graph.
    """
    import torchopt

    if first_order:
        inner_opt = torchopt.sgd(inner_lr)

        def fo_step(batch: TaskBatch) -> None:
            for t in range(len(batch)):
                params = dict(model.named_parameters())
                state = inner_opt.init(params)
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, params, (batch.support_x[t],)), batch.support_y[t])
                    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
                    updates, state = inner_opt.update(grads, state, inplace=False)
                    params = torchopt.apply_updates(params, updates, inplace=False)
                query = functional_call(model, params, (batch.query_x[t],))
                (F.cross_entropy(query, batch.query_y[t]) / len(batch)).backward()

        return fo_step

    meta_opt = torchopt.MetaSGD(model, lr=inner_lr)

    def step(batch: TaskBatch) -> None:
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(meta_opt, by="reference")
        for t in range(len(batch)):
            for _ in range(steps):
                meta_opt.step(F.cross_entropy(model(batch.support_x[t]), batch.support_y[t]))
            (F.cross_entropy(model(batch.query_x[t]), batch.query_y[t]) / len(batch)).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(meta_opt, opt_state)

    return step


MAML_CONTENDERS: dict[str, Callable[[nn.Module, float, int, bool], Step]] = {
    "fastadapt": fastadapt_maml,
    "fastadapt bf16": fastadapt_maml_bf16,
    "fastadapt 2 workers": fastadapt_maml_workers,
    "fastadapt 2 workers bf16": fastadapt_maml_workers_bf16,
    "learn2learn": learn2learn_maml,
    "higher": higher_maml,
    "torchopt": torchopt_maml,
    "plain loop": plain_maml,
}


# -- ProtoNet -----------------------------------------------------------------------------------
def _episode_embeddings(encoder: nn.Module, batch: TaskBatch, t: int) -> tuple[Tensor, Tensor]:
    """Support and query embeddings of episode t, embedded in one forward pass (episode BatchNorm)."""
    n = batch.support_x.shape[1]
    z = encoder(torch.cat([batch.support_x[t], batch.query_x[t]])).flatten(1)
    return z[:n], z[n:]


def plain_protonet(encoder: nn.Module) -> Step:
    """Plain torch per-episode loop: class means, negative squared distances, backward per episode."""

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            support, query = _episode_embeddings(encoder, batch, t)
            labels = batch.support_y[t]
            ways = int(labels.max()) + 1
            sums = support.new_zeros(ways, support.shape[1]).index_add(0, labels, support)
            protos = sums / torch.bincount(labels, minlength=ways).unsqueeze(1).to(support.dtype)
            logits = -(query.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
            (F.cross_entropy(logits, batch.query_y[t]) / len(batch)).backward()

    return step


def fastadapt_protonet(encoder: nn.Module, precision: str = "fp32") -> Step:
    """fastadapt: `ProtoNet(encoder).meta_loss(batch)`, then `backward()`."""
    net = ProtoNet(encoder, precision=precision)

    def step(batch: TaskBatch) -> None:
        net.meta_loss(batch)[0].backward()

    return step


def learn2learn_protonet(encoder: nn.Module) -> Step:
    """learn2learn 0.2.0 has no ProtoNet algorithm outside its Lightning wrapper; its core
    `l2l.nn.PrototypicalClassifier` (as that wrapper uses it) per episode, backward per episode."""
    import learn2learn as l2l

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            support, query = _episode_embeddings(encoder, batch, t)
            classifier = l2l.nn.PrototypicalClassifier(support, batch.support_y[t])
            (F.cross_entropy(classifier(query), batch.query_y[t]) / len(batch)).backward()

    return step


def fastadapt_protonet_bf16(encoder: nn.Module) -> Step:
    """fastadapt's ProtoNet under bf16 autocast (float32 weights and gradients)."""
    return fastadapt_protonet(encoder, precision="bf16")


PROTONET_CONTENDERS: dict[str, Callable[[nn.Module], Step]] = {
    "fastadapt": fastadapt_protonet,
    "fastadapt bf16": fastadapt_protonet_bf16,
    "learn2learn": learn2learn_protonet,
    "plain loop": plain_protonet,
}
