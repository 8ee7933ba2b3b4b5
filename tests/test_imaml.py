"""iMAML: the implicit meta-gradient against the exact one, conjugate gradient, memory, learning, keys."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastadapt import EpisodeSampler, TaskBatch
from fastadapt.algorithms.imaml import IMAML, proximal_adapt
from fastadapt.functional.implicit import conjugate_gradient
from fastadapt.nn import Conv4
from fastadapt.training import evaluate_learner, meta_train
from fastadapt.training.config import Config, ConfigError

F64 = torch.float64
DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")


def _regression_tasks(tasks: int, d: int, n: int, m: int) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    return TaskBatch(torch.randn(tasks, n, d, generator=g, dtype=F64), torch.randn(tasks, n, 1, generator=g, dtype=F64),
                     torch.randn(tasks, m, d, generator=g, dtype=F64), torch.randn(tasks, m, 1, generator=g, dtype=F64))


def _exact_meta_gradient(model: torch.nn.Linear, batch: TaskBatch, lam: float, damping: float) -> tuple[torch.Tensor, float]:
    """Mean over tasks of dL_query(phi*(theta))/dtheta, phi* the closed-form minimiser of the
    proximal inner problem of a linear model with MSE, differentiated by autograd through the solve.
    With damping, the damped system's solution (I + (H + damping I)/lam)^-1 grad L_query(phi*) instead."""
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).requires_grad_(True)
    total, losses = 0.0, []
    for t in range(len(batch)):
        ep = batch[t]
        a = torch.cat([ep.support_x, torch.ones(len(ep.support_x), 1, dtype=F64)], 1)
        q = torch.cat([ep.query_x, torch.ones(len(ep.query_x), 1, dtype=F64)], 1)
        hessian = 2 / len(a) * a.T @ a
        eye = torch.eye(len(theta), dtype=F64)
        phi = torch.linalg.solve(hessian + lam * eye, lam * theta + 2 / len(a) * a.T @ ep.support_y[:, 0])
        query_loss = ((q @ phi - ep.query_y[:, 0]) ** 2).mean()
        if damping == 0:
            (grad,) = torch.autograd.grad(query_loss, theta)
        else:
            (at_phi,) = torch.autograd.grad(query_loss, phi)
            grad = torch.linalg.solve(eye + (hessian + damping * eye) / lam, at_phi)
        total = total + grad / len(batch)
        losses.append(float(query_loss.detach()))
    return total, sum(losses) / len(losses)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_implicit_meta_gradient_equals_the_exact_one_on_a_quadratic_inner_problem(damping):
    torch.manual_seed(0)
    d, lam = 4, 0.7
    model = torch.nn.Linear(d, 1).double()
    batch = _regression_tasks(3, d, 6, 8)
    # 250 SGD steps of 0.2 solve these inner problems to float64 rounding (contraction <= 0.86 per step)
    imaml = IMAML(model, inner_lr=0.2, inner_steps=250, lam=lam, cg_steps=d + 1, cg_damping=damping, task="regression")
    loss, metrics = imaml.meta_loss(batch)
    loss.backward()
    got = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    reference, reference_loss = _exact_meta_gradient(model, batch, lam, damping)
    print(f"\nimplicit {got.tolist()}\nexact    {reference.tolist()}")
    assert torch.allclose(got, reference, rtol=1e-9, atol=1e-12)
    assert abs(float(loss.detach()) - reference_loss) < 1e-10 and abs(float(metrics["loss"]) - reference_loss) < 1e-10
    with torch.no_grad():  # no meta-gradient wanted: the same loss, no conjugate gradient
        assert abs(float(imaml.meta_loss(batch)[0]) - reference_loss) < 1e-10
    # the first-order direction (the query gradient at phi, what FOMAML would use) is measurably different
    imaml_first_order = IMAML(torch.nn.Linear(d, 1).double(), inner_lr=0.2, inner_steps=250, lam=lam, cg_steps=1,
                              task="regression")
    imaml_first_order.model.load_state_dict(model.state_dict())
    imaml_first_order.meta_loss(batch)[0].backward()
    first = torch.cat([imaml_first_order.model.weight.grad.flatten(), imaml_first_order.model.bias.grad])
    assert not torch.allclose(first, reference, rtol=1e-3)


def test_implicit_meta_gradient_matches_finite_differences_on_a_smooth_network():
    """Nonlinear check: tanh network, cross-entropy, the inner problem solved to stationarity; the
    directional derivative of L_query(phi*(theta)) by central differences against the implicit one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(6, 16, generator=g, dtype=F64), torch.rand(6, 16, generator=g, dtype=F64)
    sy = qy = torch.arange(3).repeat(2)
    imaml = IMAML(model, inner_lr=0.2, inner_steps=400, lam=2.0, cg_steps=200)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi, _ = proximal_adapt(model, theta, sx, sy, loss_fn=torch.nn.functional.cross_entropy, steps=400, lr=0.2, lam=2.0)
    grads, _, _ = imaml.implicit_gradient(phi, {}, (sx, sy), (qx, qy))
    direction = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}

    def query_loss(t: float) -> float:
        moved = {k: theta[k] + t * direction[k] for k in theta}
        adapted, _ = proximal_adapt(model, moved, sx, sy, loss_fn=torch.nn.functional.cross_entropy, steps=400,
                                    lr=0.2, lam=2.0)
        return float(torch.nn.functional.cross_entropy(torch.func.functional_call(model, adapted, (qx,)), qy))

    finite = (query_loss(1e-5) - query_loss(-1e-5)) / 2e-5
    implicit = sum(float((grad * direction[k]).sum()) for k, grad in zip(theta, grads))
    assert implicit == pytest.approx(finite, rel=1e-6, abs=1e-9)


def test_conjugate_gradient_converges_to_the_direct_solve():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=F64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=F64)
    b = torch.randn(6, generator=g, dtype=F64)
    exact = torch.linalg.solve(a, b)
    errors = []
    for steps in range(1, 7):
        (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps)
        errors.append(float((x - exact) @ a @ (x - exact)))  # CG minimises the A-norm error at each step
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-20 and errors[0] > 1e-6
    # several tensors (one per parameter) form one vector: the same solve, split
    x1, x2 = conjugate_gradient(lambda v: list((a @ torch.cat([v[0], v[1]])).split([2, 4])), list(b.split([2, 4])), 6)
    assert torch.allclose(torch.cat([x1, x2]), exact, atol=1e-12)


def test_conjugate_gradient_stops_at_non_positive_curvature():
    a = torch.diag(torch.tensor([2.0, -1.0], dtype=F64))  # indefinite: the second search direction has p'Ap < 0
    b = torch.tensor([1.0, 1.0], dtype=F64)
    for steps in (1, 2, 10):
        (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps)
        assert torch.equal(x, torch.tensor([2.0, 2.0], dtype=F64))  # the first step's iterate, then it stops
    zero = torch.zeros(2, dtype=F64)
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [zero], 3)  # zero right-hand side: zero, not NaN
    assert torch.equal(x, zero)


def test_inner_solvers_reach_the_proximal_minimiser():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    ep = _regression_tasks(1, 3, 6, 1)[0]
    theta = {k: v.detach() for k, v in model.named_parameters()}
    lam = 1.0
    a = torch.cat([ep.support_x, torch.ones(6, 1, dtype=F64)], 1)
    start = torch.cat([theta["weight"].flatten(), theta["bias"]])
    exact = torch.linalg.solve(2 / 6 * a.T @ a + lam * torch.eye(4, dtype=F64), lam * start + 2 / 6 * a.T @ ep.support_y[:, 0])
    for optimizer, steps, lr, tol in (("sgd", 150, 0.2, 1e-12), ("adam", 500, 0.01, 1e-9)):
        phi, first_loss = proximal_adapt(model, theta, ep.support_x, ep.support_y, loss_fn=torch.nn.functional.mse_loss,
                                         steps=steps, lr=lr, lam=lam, optimizer=optimizer)
        got = torch.cat([phi["weight"].flatten(), phi["bias"]])
        assert float((got - exact).abs().max()) < tol, (optimizer, got, exact)
        with torch.no_grad():
            assert float(first_loss) == pytest.approx(float(torch.nn.functional.mse_loss(model(ep.support_x), ep.support_y)))
    assert torch.equal(model.weight.detach(), theta["weight"])  # the module itself never moves


_MEMORY_CHILD = """
import ctypes, json, sys
import torch
from fastadapt import MAML, TaskBatch
from fastadapt.algorithms.imaml import IMAML
from fastadapt.nn import Conv4

def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

algorithm, counts = sys.argv[1], [int(k) for k in sys.argv[2:]]
torch.set_num_threads(1)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
y = torch.arange(5).repeat_interleave(5)[None]
batch = TaskBatch(torch.rand(1, 25, 1, 28, 28, generator=g), y, torch.rand(1, 25, 1, 28, 28, generator=g), y)
make = lambda k: IMAML(Conv4.omniglot(5), inner_steps=k) if algorithm == "imaml" else MAML(Conv4.omniglot(5), 0.1, k)
make(1).meta_loss(batch)[0].backward()  # warm-up: one-time allocations
peaks = {}
for steps in counts:
    learner = make(steps)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so RSS is what is in use
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    before = kb("VmRSS")
    learner.meta_loss(batch)[0].backward()
    peaks[steps] = (kb("VmHWM") - before) / 1024
    del learner
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_memory_does_not_grow_with_inner_steps():
    """Peak RSS of one meta-gradient step (Conv4, 5-way 5-shot, 5 queries per class) above the RSS
    before it (peak reset, freed memory trimmed before each step); second-order MAML is the control
    that the measure sees a growing graph."""
    runs = {algorithm: subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, algorithm, *map(str, counts)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for algorithm, counts in (("imaml", (5, 20, 50)), ("maml", (5, 20)))}
    peaks = {}
    for algorithm, process in runs.items():  # one thread each, side by side: the peaks are per process
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        peaks[algorithm] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    imaml, maml = peaks["imaml"], peaks["maml"]
    print("\npeak MB above the pre-step RSS: iMAML", {k: round(v) for k, v in imaml.items()},
          "second-order MAML", {k: round(v) for k, v in maml.items()})
    assert maml[20] > maml[5] + 75  # the measure sees a growing graph (about 10 MB per MAML step)
    assert max(imaml.values()) < min(imaml.values()) + 40  # flat: no growth with 10x the inner steps
    assert imaml[50] < maml[5]


def _conv4_episodes(tasks: int, shots: int) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(5)
    return TaskBatch(torch.rand(tasks, 5 * shots, 1, 28, 28, generator=g, dtype=F64),
                     labels.repeat_interleave(shots).expand(tasks, -1),
                     torch.rand(tasks, 10, 1, 28, 28, generator=g, dtype=F64), labels.repeat_interleave(2).expand(tasks, -1))


@pytest.mark.parametrize("inner_optimizer, frozen", [("sgd", False), ("adam", False), ("sgd", True)])
def test_tasks_at_once_equal_task_by_task_in_float64(inner_optimizer, frozen, one_thread):
    """Inner problems and CG solves of several tasks in one batched graph (groups of 2 and 8 over 5
    tasks: uneven groups) give the per-task meta-gradient, losses and metrics, in training and test."""
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=16).double()
    if frozen:
        model.features[4].weight.requires_grad_(False)
    batch = _conv4_episodes(5, 1)
    results = {}
    for name, group in (("per task", None), ("groups of 2", 2), ("groups of 8", 8)):
        imaml = IMAML(model, inner_lr=0.1, inner_steps=2, lam=2.0, cg_steps=3, cg_damping=1.0,
                      inner_optimizer=inner_optimizer, task_group=group)
        assert (imaml.plan(batch).path == "task-groups") == (group is not None)  # Conv4: tasks can be solved at once
        model.zero_grad(set_to_none=True)
        loss, metrics = imaml.meta_loss(batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[name] = (loss.detach(), metrics, grads, imaml.task_metrics(batch))
    reference = results.pop("per task")
    for loss, metrics, grads, tested in results.values():
        torch.testing.assert_close(loss, reference[0], rtol=1e-10, atol=1e-12)
        for key in reference[1]:
            torch.testing.assert_close(metrics[key], reference[1][key], rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, reference[2]):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
        for key in reference[3]:
            torch.testing.assert_close(tested[key], reference[3][key], rtol=1e-10, atol=1e-12)
    assert any(r.abs().max() > 1e-6 for r in reference[2])  # a meta-gradient that is not all zeros


def test_batched_conjugate_gradient_solves_each_system_on_its_own():
    """Three SPD systems and one indefinite one: each gets its own step sizes, and the indefinite
    one's truncation stops it alone."""
    g = torch.Generator().manual_seed(0)
    factors = torch.randn(4, 4, 4, generator=g, dtype=F64)
    systems = factors @ factors.transpose(1, 2) + 4 * torch.eye(4, dtype=F64)  # SPD
    systems[3] = torch.diag(torch.tensor([2.0, -1.0, 3.0, 1.0], dtype=F64))   # indefinite
    b = torch.randn(4, 4, generator=g, dtype=F64)
    b[3] = torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=F64)  # b'Ab = 2 - 9 < 0: stops at once
    x = conjugate_gradient(lambda v: [(systems @ v[0][..., None])[..., 0]], [b], 4, batched=True)[0]
    for t in range(4):
        alone = conjugate_gradient(lambda v: [systems[t] @ v[0]], [b[t]], 4)[0]
        torch.testing.assert_close(x[t], alone, rtol=1e-12, atol=1e-12)
    for t in range(3):
        torch.testing.assert_close(systems[t] @ x[t], b[t], rtol=1e-8, atol=1e-10)
    assert torch.equal(x[3], torch.zeros(4, dtype=F64))


@needs_omniglot
def test_imaml_learns_omniglot_5way_1shot_well_above_chance_and_above_its_start(one_thread):
    """A narrow Conv4 (16 filters), 160 iterations of 4 tasks with the recipes' inner problem and
    damped system (inner SGD 0.1 x 5 steps, lambda 2, 5 CG steps, damping 22). (80 iterations sat
    within noise of the 5-point margin: 58-65% depending on float rounding, e.g. tasks at once or
    one by one; 160 reach 70-71% either way.)"""
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA)
    torch.manual_seed(0)
    imaml = IMAML(Conv4(1, 5, 16, 28), inner_lr=0.1, inner_steps=5, lam=2.0, cg_steps=5, cg_damping=22.0)
    test = EpisodeSampler(splits["test"], 5, 1, 5, seed=0)
    before = evaluate_learner(imaml, test, episodes=64)["accuracy"]
    meta_train(imaml, EpisodeSampler(splits["train"], 5, 1, 1, seed=0), iterations=160, meta_batch=4, meta_lr=5e-3)
    after = evaluate_learner(imaml, test, episodes=64)["accuracy"]
    print(f"\n5-way 1-shot test accuracy (64 episodes) before {before}, after {after}")
    assert after.mean > 0.55 and after.mean > before.mean + 0.05  # chance: 0.2; the same 64 episodes before and after


@pytest.mark.parametrize("values, message", [
    ({"imaml_lambda": 0}, "imaml_lambda must be a number > 0, got 0 (int)"),
    ({"imaml_lambda": -1.5}, "must be a number > 0, got -1.5"),
    ({"cg_steps": 0}, "cg_steps must be an integer >= 1, got 0"),
    ({"cg_steps": 2.5}, "cg_steps must be an integer"),
    ({"cg_damping": -0.1}, "cg_damping must be a number >= 0, got -0.1"),
    ({"eval_imaml_lambda": -0.5}, "eval_imaml_lambda must be a number >= 0, or null, got -0.5"),
    ({"imaml_proximal": "sometimes"}, "imaml_proximal must be one of"),
    ({"inner_optimizer": "rmsprop"}, "got 'rmsprop'"),
    ({"inner_optimizer": "momentum"}, "inner_optimizer 'momentum' is not implemented for imaml; use sgd or adam"),
    ({"precision": "bf16"}, "precision 'bf16' is not implemented for imaml"),
])
def test_bad_imaml_keys_are_refused_with_the_key_and_the_value(values, message):
    with pytest.raises(ConfigError) as error:
        Config.from_dict({"algorithm": "imaml", **values})
    assert message in str(error.value)


def test_bad_constructor_arguments_name_the_value():
    model = torch.nn.Linear(1, 1)
    for kwargs, message in (({"lam": 0.0}, "lam (the proximal regularisation strength) must be > 0, got 0.0"),
                            ({"cg_steps": 0}, "cg_steps must be an integer >= 1"),
                            ({"cg_damping": -1.0}, "cg_damping must be >= 0, got -1.0"),
                            ({"eval_lam": -0.1}, "eval_lam (the proximal strength at test time) must be >= 0"),
                            ({"proximal": "never"}, "proximal must be 'every_step' or 'pull_back', got 'never'"),
                            ({"inner_optimizer": "lbfgs"}, "inner_optimizer must be 'sgd' or 'adam', got 'lbfgs'")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            IMAML(model, **kwargs)
    with pytest.raises(ConfigError, match="eval_imaml_lambda=0.0 applies to algorithm 'imaml', not 'maml'"):
        Config.from_dict({"algorithm": "maml", "eval_imaml_lambda": 0.0})
    with pytest.raises(ConfigError, match="inner_optimizer='adam' applies to imaml"):
        Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4", "inner_optimizer": "adam"})


def test_test_time_lambda_zero_is_plain_fine_tuning_and_leaves_training_alone():
    """eval_lam=0 adapts by plain SGD on the support loss (the authors' measure_accuracy.py), step for
    step as torch.optim.SGD; the training meta-gradient is the one with the training lambda."""
    torch.manual_seed(0)
    ep = _regression_tasks(1, 3, 6, 4)[0]
    model = torch.nn.Linear(3, 1).double()
    reference = torch.nn.Linear(3, 1).double()
    reference.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(7):
        sgd.zero_grad()
        torch.nn.functional.mse_loss(reference(ep.support_x), ep.support_y).backward()
        sgd.step()
    plain = IMAML(model, inner_lr=0.05, inner_steps=7, lam=3.0, eval_lam=0.0, task="regression")
    proximal = IMAML(model, inner_lr=0.05, inner_steps=7, lam=3.0, task="regression")
    queries = torch.randn(5, 3, dtype=F64)
    assert torch.allclose(plain.adapt(ep.support_x, ep.support_y)(queries), reference(queries), rtol=0, atol=1e-14)
    pulled_back = proximal.adapt(ep.support_x, ep.support_y)(queries)
    assert not torch.allclose(pulled_back, reference(queries), atol=1e-6)  # lambda 3 pulls toward theta
    batch = _regression_tasks(2, 3, 6, 4)
    assert torch.equal(plain.query_outputs(batch)[0], plain.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]))
    grads = []
    for learner in (plain, proximal):
        model.zero_grad()
        learner.meta_loss(batch)[0].backward()
        grads.append(model.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_pull_back_is_plain_steps_then_one_step_toward_theta_on_every_path(one_thread):
    """proximal="pull_back" (the authors' code): torch.optim.SGD on the support loss alone, then
    phi <- phi - lr * lam * (phi - theta); task by task and tasks at once alike (float64)."""
    torch.manual_seed(0)
    model = Conv4(ways=3, hidden=4).double()
    g = torch.Generator().manual_seed(3)
    y = torch.arange(3).repeat(2)
    batch = TaskBatch(torch.rand(2, 6, 1, 28, 28, generator=g, dtype=F64), torch.stack([y, y]),
                      torch.rand(2, 6, 1, 28, 28, generator=g, dtype=F64), torch.stack([y, y]))
    reference = Conv4(ways=3, hidden=4).double()
    reference.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(reference(batch.support_x[0]), batch.support_y[0]).backward()
        sgd.step()
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), model.parameters()):
            p.sub_(0.1 * 2.0 * (p - p0))
        expected = reference(batch.query_x[0])
    outputs = [IMAML(model, inner_lr=0.1, inner_steps=3, lam=2.0, proximal="pull_back", task_group=group
                     ).query_outputs(batch)[0] for group in (None, 2)]
    for got in outputs:
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    every_step = IMAML(model, inner_lr=0.1, inner_steps=3, lam=2.0).query_outputs(batch)[0]
    assert not torch.allclose(every_step, expected, atol=1e-6)


def test_eval_command_adapts_with_another_lambda_and_keeps_both_results(tmp_path, capsys):
    from fastadapt.cli import main

    assert main(["run", "--algo", "imaml", "--iterations", "2", "--eval-episodes", "4", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--episodes", "20", "--imaml-lambda", "0"]) == 0
    assert main(["eval", str(tmp_path), "--episodes", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lambda 0" in lines[0] and "lambda 0.5" in lines[1], lines
    names = sorted(path.name for path in (tmp_path / "evals").glob("*-20ep.json"))
    assert len(names) == 2 and names[1].endswith("-10steps-lambda0-20ep.json"), names  # the default's result kept
    proximal, plain = (json.loads((tmp_path / "evals" / name).read_text()) for name in names)
    assert plain["imaml_lambda"] == 0 and proximal["imaml_lambda"] == 0.5
    assert plain["mean"] != proximal["mean"]
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--imaml-lambda", "-1"])
    assert "argument --imaml-lambda: expected a number >= 0, got '-1'" in capsys.readouterr().err
    maml_run = tmp_path / "maml"
    assert main(["run", "--iterations", "2", "--eval-episodes", "4", "--threads", "1", "--out", str(maml_run)]) == 0
    assert main(["eval", str(maml_run), "--episodes", "4", "--imaml-lambda", "0"]) == 2
    assert "imaml_lambda applies to iMAML runs" in capsys.readouterr().err


def test_run_command_trains_imaml_on_sinusoid_and_writes_results(tmp_path, capsys):
    from fastadapt.cli import main

    assert main(["run", "--algo", "imaml", "--iterations", "3", "--eval-episodes", "4", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    assert "post-adaptation mse" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["algorithm"] == "imaml" and results["steps"] == 3 and results["metric"] == "mse"


@needs_omniglot
def test_train_command_runs_an_imaml_recipe(tmp_path):
    sets = [f"--set={key}={value}" for key, value in dict(
        iterations=2, meta_batch=2, inner_steps=2, eval_inner_steps=2, validation_every=0, checkpoint_every=1,
        eval_episodes=4, threads=1, data_root=DATA).items()]
    done = subprocess.run([sys.executable, "-m", "fastadapt.cli", "train", "recipes/imaml/omniglot-5w1s.yaml",
                           "--out", str(tmp_path), *sets], check=False, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["cg_damping"] == 22.0 and results["config"]["inner_lr"] == 0.1
    assert results["metric"] == "accuracy" and results["episodes"] == 4 and results["steps"] == 2


def test_recipes_cover_the_four_omniglot_settings_with_the_papers_values():
    from fastadapt.training.recipes import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "imaml"
    for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
        config = load_recipe(recipes / f"omniglot-{ways}w{shots}s.yaml")
        assert (config.algorithm, config.ways, config.shots, config.queries) == ("imaml", ways, shots, shots)
        assert config.inner_steps == config.eval_inner_steps == (16 if ways == 5 else 25)
        assert (config.imaml_lambda, config.cg_steps, config.inner_lr, config.meta_lr) == (2.0, 5, 0.1, 1e-3)
        assert config.eval_imaml_lambda is None  # test as trained: lambda 0 tested lower on trained models
