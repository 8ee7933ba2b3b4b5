"""Differentiable inner optimizers (functional.optim): gradient transformations and their chains
against torch.optim (weight decay and clip_grad_norm_ included) step for step, exact second-order
meta-gradients (central finite differences, float64), Adam's NaN-safe root, vmap and per-task
updates of stacked tasks, bad arguments, and every execution path of the gradient learner against
a plain autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fastadapt import MAML, TaskBatch
from meta_grad_helpers import adapted_params
from fastadapt.functional.optim import (ScaleByLrState, add_decayed_weights, adam, apply_updates, chain,
                                       clip_by_global_norm, make_inner_optimizer, momentum, per_task, safe_sqrt,
                                       scale_by_lr, sgd, trace)
from fastadapt.nn import MLP, Conv4
from meta_grad_helpers import assert_grads_close, engine_grads

MAX_NORM = 0.3  # below every gradient norm of these tests' losses: the clipped chains clip at every step


class _ClipThenSGD(torch.optim.SGD):
    """torch.nn.utils.clip_grad_norm_ before every torch.optim.SGD step."""

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for group in self.param_groups for p in group["params"]], MAX_NORM)
        return super().step(closure)


OPTIMIZERS = {
    "sgd": (lambda lr: sgd(lr), lambda p, lr: torch.optim.SGD(p, lr=lr)),
    "momentum": (lambda lr: momentum(lr, beta=0.8), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.8)),
    "nesterov": (lambda lr: momentum(lr, beta=0.7, nesterov=True),
                 lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.7, nesterov=True)),
    "adam": (lambda lr: adam(lr, betas=(0.8, 0.95), eps=1e-6),
             lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.8, 0.95), eps=1e-6)),
    "decay-trace-lr chain": (lambda lr: chain(add_decayed_weights(0.3), trace(0.8), scale_by_lr(lr)),
                             lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.8, weight_decay=0.3)),
    "adam weight_decay": (lambda lr: adam(lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2),
                          lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)),
    "clip-sgd chain": (lambda lr: chain(clip_by_global_norm(MAX_NORM), scale_by_lr(lr)),
                       lambda p, lr: _ClipThenSGD(p, lr=lr)),
}


def _step(opt, grads, state, params):
    """One optimizer step: the updates applied."""
    updates, state = opt.update(grads, state, params)
    return apply_updates(params, updates), state


pytestmark = pytest.mark.usefixtures("one_thread", "float64")


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _data(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_matches_torch_optim_step_for_step(name):
    ours_of, theirs_of = OPTIMIZERS[name]
    model, reference = _tiny_model(), _tiny_model()
    x, y = _data()
    torch_opt = theirs_of(reference.parameters(), 0.05)
    opt = ours_of(0.05)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = opt.init(params)
    for step in range(6):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        if "clip" in name:
            assert torch.cat([g.reshape(-1) for g in grads.values()]).norm() > MAX_NORM  # it clips
        params, state = _step(opt, grads, state, params)
        torch_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        torch_opt.step()
        for k, p in reference.named_parameters():
            assert torch.allclose(params[k], p, rtol=0, atol=1e-12), (name, step, k)
    assert state[-1] == ScaleByLrState(6)


@pytest.mark.parametrize("lr", [0.37, torch.tensor(0.37, dtype=torch.float32), {"w": 0.37}])
def test_sgd_updates_are_bit_for_bit_p_minus_lr_g(lr):
    g = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(1000, generator=g, dtype=torch.float32)}
    grads = {"w": torch.randn(1000, generator=g, dtype=torch.float32) * 10.0 ** torch.randint(-8, 8, (1000,))}
    opt = sgd(lr)
    new, _ = _step(opt, grads, opt.init(params), params)
    rate = lr["w"] if isinstance(lr, dict) else lr
    assert torch.equal(new["w"], params["w"] - rate * grads["w"])


def test_per_parameter_rates_match_torch_parameter_groups():
    model, reference = _tiny_model(), _tiny_model()
    x, y = _data()
    names = [k for k, _ in model.named_parameters()]
    rates = {k: 0.01 * (i + 1) for i, k in enumerate(names)}
    torch_opt = torch.optim.Adam([{"params": [p], "lr": rates[k]} for k, p in reference.named_parameters()])
    opt = adam(rates)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = opt.init(params)
    for _ in range(5):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        params, state = _step(opt, dict(zip(params, torch.autograd.grad(loss, list(params.values())))), state, params)
        torch_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        torch_opt.step()
    for k, p in reference.named_parameters():
        assert torch.allclose(params[k], p, rtol=0, atol=1e-12), k


def _meta_loss_of(model, make_opt, steps, first_order=False):
    """The query loss after `steps` inner steps, as a function of the flattened initialisation."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sx, sy = _data(1)
    qx, qy = _data(2)

    def meta_loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        adapted, _ = adapted_params(model, params, sx, sy, loss_fn=F.mse_loss, steps=steps, optimizer=make_opt(),
                                 names=names, first_order=first_order)
        return F.mse_loss(functional_call(model, adapted, (qx,)), qy)

    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().requires_grad_()
    return meta_loss, flat


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_second_order_meta_gradient_through_each_optimizer_matches_finite_differences(name):
    model = _tiny_model(1)
    meta_loss, flat = _meta_loss_of(model, lambda: OPTIMIZERS[name][0](0.1), steps=3)
    assert torch.autograd.gradcheck(meta_loss, (flat,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the check can tell first from second order
    first, _ = _meta_loss_of(model, lambda: OPTIMIZERS[name][0](0.1), steps=3, first_order=True)
    exact = torch.autograd.grad(meta_loss(flat), flat)[0]
    approximate = torch.autograd.grad(first(flat), flat)[0]
    assert (exact - approximate).abs().max() > 1e-4


def test_learned_per_step_rates_get_exact_gradients():
    model = _tiny_model(2)
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    sx, sy = _data(1)
    qx, qy = _data(2)

    def meta_loss(rates: torch.Tensor) -> torch.Tensor:  # (steps, tensors): MAML++'s per-step, per-layer rates
        lr = [{k: rates[s, i] for i, k in enumerate(names)} for s in range(rates.shape[0])]
        adapted, _ = adapted_params(model, params, sx, sy, loss_fn=F.mse_loss, steps=3, optimizer=momentum(lr),
                                 names=names)
        return F.mse_loss(functional_call(model, adapted, (qx,)), qy)

    rates = torch.full((3, len(names)), 0.1).add_(torch.linspace(0, 0.05, 3 * len(names)).view(3, -1))
    assert torch.autograd.gradcheck(meta_loss, (rates.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def _clipped_chain(lr):
    return chain(clip_by_global_norm(MAX_NORM), trace(0.9), scale_by_lr(lr))


def _support_gradient_norm(model) -> torch.Tensor:
    sx, sy = _data(1)
    grads = torch.autograd.grad(F.mse_loss(model(sx), sy), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).norm()


def test_clipped_chain_second_order_meta_gradient_matches_finite_differences():
    model = _tiny_model(1)
    assert _support_gradient_norm(model) > 2 * MAX_NORM  # the clip is active, away from its kink
    meta_loss, flat = _meta_loss_of(model, lambda: _clipped_chain(0.1), steps=2)
    assert torch.autograd.gradcheck(meta_loss, (flat,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_learned_rate_of_a_clipped_chain_gets_its_exact_meta_gradient():
    model = _tiny_model(2)
    assert _support_gradient_norm(model) > 2 * MAX_NORM
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    sx, sy = _data(1)
    qx, qy = _data(2)

    def meta_loss(rate: torch.Tensor) -> torch.Tensor:
        adapted, _ = adapted_params(model, params, sx, sy, loss_fn=F.mse_loss, steps=2, optimizer=_clipped_chain(rate),
                                 names=names)
        return F.mse_loss(functional_call(model, adapted, (qx,)), qy)

    rate = torch.tensor(0.1, requires_grad=True)
    assert torch.autograd.gradcheck(meta_loss, (rate,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.grad(meta_loss(rate), rate)[0] != 0


def test_per_task_updates_each_stacked_task_on_its_own():
    g = torch.Generator().manual_seed(5)
    stacked = {"w": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 2, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in stacked.items()} for _ in range(3)]
    opt = per_task(_clipped_chain(0.1))
    params, state = stacked, opt.init(stacked)
    for step_grads in grads:
        params, state = _step(opt, step_grads, state, params)
    for t in range(4):
        one = {k: v[t] for k, v in stacked.items()}
        one_state = _clipped_chain(0.1).init(one)
        for step_grads in grads:
            one, one_state = _step(_clipped_chain(0.1), {k: v[t] for k, v in step_grads.items()}, one_state, one)
        for k in one:
            assert torch.allclose(params[k][t], one[k], rtol=0, atol=1e-14), (t, k)
    # without per_task the norm would span all tasks
    joint, _ = _step(_clipped_chain(0.1), grads[0], _clipped_chain(0.1).init(stacked), stacked)
    alone, _ = _step(opt, grads[0], opt.init(stacked), stacked)
    assert not torch.allclose(joint["w"], alone["w"])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_work_under_no_grad(name):
    opt = OPTIMIZERS[name][0](torch.tensor(0.1, requires_grad=True))
    params = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(6), requires_grad=True)}
    grads = {"w": torch.ones(3, 2)}
    with torch.no_grad():
        quiet, _ = _step(opt, grads, opt.init(params), params)
    loud, _ = _step(opt, grads, opt.init(params), params)
    assert not quiet["w"].requires_grad and loud["w"].requires_grad
    assert torch.equal(quiet["w"], loud["w"].detach())


def _naive_adam_update(g: torch.Tensor, lr: float = 0.1) -> torch.Tensor:
    """One Adam step written with a plain sqrt (what higher and TorchOpt do)."""
    m, v = 0.1 * g, 0.001 * g * g
    return -lr * (m / 0.1) / (torch.sqrt(v / 0.001) + 1e-8)


def test_adam_root_gives_finite_second_order_gradients_where_gradients_are_exactly_zero():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(6, 3)
    x[:, 1] = 0.0  # the weight of input 1 gets exactly zero inner gradients
    y, qx, qy = torch.randn(6, 1), torch.randn(6, 3), torch.randn(6, 1)
    params = dict(model.named_parameters())
    adapted, _ = adapted_params(model, params, x, y, loss_fn=F.mse_loss, steps=3, optimizer=adam(0.1),
                             names=list(params))
    query = F.mse_loss(functional_call(model, adapted, (qx,)), qy)
    grads = torch.autograd.grad(query, list(params.values()), create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    # and the meta-gradient is differentiable again (a Hessian-vector product), still finite
    hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), list(params.values()))
    assert all(torch.isfinite(h).all() for h in hvp)
    # a plain sqrt turns the same zeros into NaN
    w = params["weight"]
    g_inner = torch.autograd.grad(F.mse_loss(x @ w.t(), y), w, create_graph=True)[0]
    assert g_inner[0, 1] == 0
    naive = torch.autograd.grad((w + _naive_adam_update(g_inner)).sum(), w)[0]
    assert torch.isnan(naive).any()


def test_safe_sqrt_value_and_derivatives():
    x = torch.tensor([0.0, 0.25, 4.0], requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 2.0]))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.allclose(g, torch.tensor([0.0, 1.0, 0.25]))
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(gg).all() and gg[0] == 0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_work_under_vmap_over_parameter_sets(name):
    make = OPTIMIZERS[name][0]
    model = torch.nn.Linear(3, 2)
    x, y = _data(3)
    g = torch.Generator().manual_seed(4)
    batch = {"weight": torch.randn(5, 2, 3, generator=g), "bias": torch.randn(5, 2, generator=g)}

    def run(params):
        opt = make(0.05)
        state = opt.init(params)
        for _ in range(4):
            grads = grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(params)
            params, state = _step(opt, grads, state, params)
        return params

    vectorised = vmap(run)(batch)
    for i in range(5):
        one = run({k: v[i] for k, v in batch.items()})
        for k in one:
            assert torch.allclose(vectorised[k][i], one[k], rtol=0, atol=1e-12), (name, i, k)


@pytest.mark.parametrize("make, match", [
    (lambda: sgd(0.0), r"lr must be a finite number > 0"),
    (lambda: sgd(-0.1), r"lr must be a finite number > 0 \(or a tensor\), got -0.1"),
    (lambda: sgd("fast"), r"lr must be a finite number > 0 .*'fast'"),
    (lambda: sgd({"w": float("nan")}), r"lr\['w'\] must be a finite number"),
    (lambda: sgd([]), r"per-step list needs at least one entry"),
    (lambda: sgd(torch.tensor(1)), r"floating-point tensor"),
    (lambda: momentum(0.1, beta=1.0), r"beta must be a number in \[0, 1\), got 1.0"),
    (lambda: momentum(0.1, beta=0.0, nesterov=True), r"nesterov momentum needs beta > 0"),
    (lambda: adam(0.1, betas=(0.9, 1.5)), r"betas\[1\] must be a number in \[0, 1\), got 1.5"),
    (lambda: adam(0.1, betas=0.9), r"betas must be a pair"),
    (lambda: adam(0.1, eps=0.0), r"eps must be a finite number > 0, got 0.0"),
    (lambda: make_inner_optimizer("rmsprop", 0.1), r"must be one of sgd, momentum, adam; got 'rmsprop'"),
    (lambda: clip_by_global_norm(0), r"max_norm must be a finite number > 0, got 0"),
    (lambda: add_decayed_weights(-0.1), r"weight_decay must be a finite number >= 0, got -0.1"),
    (lambda: momentum(0.1, weight_decay=float("inf")), r"weight_decay must be a finite number >= 0, got inf"),
    (lambda: chain(sgd(0.1), "fast"), r"chain takes GradientTransformations; argument 1 is 'fast'"),
    (lambda: add_decayed_weights(0.1).update({"w": torch.ones(1)}, ()), r"add_decayed_weights needs the parameters"),
    (lambda: apply_updates({"w": torch.ones(1)}, {"v": torch.ones(1)}), r"updates has \['v'\], params has \['w'\]"),
])
def test_bad_arguments_are_refused_with_the_value_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_updates_name_the_missing_tensors_and_steps():
    params = {"w": torch.zeros(2), "b": torch.zeros(1)}
    grads = {"w": torch.ones(2), "b": torch.ones(1)}
    opt = sgd({"w": 0.1})
    with pytest.raises(ValueError, match=r"no rate for parameter\(s\) \['b'\]"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(ValueError, match=r"grads has \['w'\], params has \['b', 'w'\]"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)
    per_step = adam([0.1, 0.2])
    state = per_step.init(params)
    for _ in range(2):
        params, state = _step(per_step, grads, state, params)
    with pytest.raises(ValueError, match="per-step learning rates for 2 steps; step 3"):
        per_step.update(grads, state, params)


def test_learner_refuses_unknown_or_unsupported_inner_optimizers():
    model = Conv4(in_channels=1, ways=3, hidden=4, image_size=16)
    with pytest.raises(ValueError, match="inner_optimizer must be one of sgd, momentum, adam .*'lbfgs'"):
        MAML(model, inner_optimizer="lbfgs")


# -- the learner's execution paths against a plain autograd reference ---------------------------

def _image_batch(tasks=3, ways=3, shots=2, queries=2, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g), ys,
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g), yq)


def _reference(learner, batch, loss):
    """Per-task loop: torch.autograd.grad(create_graph=True) and the optimizer, nothing else."""
    model = learner.model
    total = 0.0
    for t in range(len(batch)):
        params = dict(model.named_parameters())
        names = learner.adapt_names
        opt = learner.inner_optimizer_for_task()
        adapted = {n: params[n] for n in names}
        state = opt.init(adapted)
        for _ in range(learner.inner_steps):
            inner = loss(functional_call(model, {**params, **adapted}, (batch.support_x[t],)), batch.support_y[t])
            grads = dict(zip(names, torch.autograd.grad(inner, list(adapted.values()), create_graph=True)))
            adapted, state = _step(opt, grads, state, adapted)
        total = total + loss(functional_call(model, {**params, **adapted}, (batch.query_x[t],)), batch.query_y[t])
    trainable = [p for p in learner.parameters() if p.requires_grad]
    return torch.autograd.grad(total / len(batch), trainable, allow_unused=True)


def _conv4(seed=0):
    torch.manual_seed(seed)
    return Conv4(in_channels=1, ways=3, hidden=6, image_size=16)


def test_task_batched_support_phase_clips_each_task_on_its_own():
    learner = MAML(_conv4(), inner_lr=0.3, inner_steps=2,
                   inner_optimizer=lambda lr: chain(clip_by_global_norm(0.05), scale_by_lr(lr)))
    batch = _image_batch()
    assert learner.plan(batch).path == "task-groups"  # the grouped-convolution support phase is used
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, F.cross_entropy))


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("execution", ["loop", "graph", "per-task", "loop-checkpointed", "per-task-checkpointed"])
def test_conv4_learner_paths_with_inner_optimizers_match_reference(optimizer, execution):
    lr = 0.3 if optimizer == "momentum" else 0.01
    learner = MAML(_conv4(), inner_lr=lr, inner_steps=3, inner_optimizer=optimizer,
                   execution=execution.removesuffix("-checkpointed"),
                   checkpoint_inner_loop=execution.endswith("-checkpointed"))
    batch = _image_batch()
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, F.cross_entropy))


def test_task_batched_and_per_task_paths_agree_with_per_step_rates_and_adam():
    learner = MAML(_conv4(), inner_lr=0.01, inner_steps=2, inner_optimizer="adam", per_step_inner_lr=True)
    with torch.no_grad():
        for rates in learner.per_step_lrs:
            rates.mul_(torch.tensor([1.0, 0.6]))
    batch = _image_batch()
    assert learner.plan(batch).path == "task-groups"  # the grouped-convolution support phase is used
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, F.cross_entropy))
    # every weight's per-step rates are learned (a conv bias before BatchNorm has no gradient at all)
    weights = [r for n, r in zip(learner.adapt_names, learner.per_step_lrs) if n.endswith("weight")]
    assert all(r.grad is not None and r.grad.abs().min() > 0 for r in weights)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_mlp_vmap_path_with_inner_optimizers_matches_reference(optimizer):
    torch.manual_seed(1)
    learner = MAML(MLP(1, [8, 8], 1), inner_lr=0.02, inner_steps=3, inner_optimizer=optimizer, task="regression")
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(4, 6, 1, generator=g) for _ in range(4)))
    assert learner.plan(batch).path == "vmap"
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, F.mse_loss))


def test_adapt_and_evaluation_use_the_inner_optimizer():
    learner = MAML(_conv4(), inner_lr=0.01, inner_steps=2, inner_optimizer="adam")
    plain = MAML(learner.model, inner_lr=0.01, inner_steps=2)
    batch = _image_batch(tasks=2)
    ep = batch[0]
    with torch.no_grad():
        ours = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
        sgd_out = plain.adapt(ep.support_x, ep.support_y)(ep.query_x)
    params = dict(learner.model.named_parameters())
    adapted, _ = adapted_params(learner.model, params, ep.support_x, ep.support_y, loss_fn=F.cross_entropy, steps=2,
                             optimizer=adam(0.01), names=list(params))
    assert torch.allclose(ours, functional_call(learner.model, adapted, (ep.query_x,)), atol=1e-10)
    assert not torch.allclose(ours, sgd_out, atol=1e-4)
    metrics = learner.task_metrics(batch)
    assert torch.allclose(metrics["loss"][0], F.cross_entropy(ours, ep.query_y))
