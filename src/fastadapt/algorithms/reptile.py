"""Reptile (Nichol, Achiam & Schulman 2018): move the initialisation toward task-adapted weights.

Per task, the inner loop takes `inner_steps` first-order steps of SGD, momentum or Adam (the
paper's Adam has beta1 = 0; `functional.optim`) on shuffled mini-batches of the support set, from
the meta-parameters theta to phi_t; no outer graph is built. `meta_loss(batch)` returns a loss whose `backward()` deposits
`theta - mean_t(phi_t)`, so an outer `torch.optim.SGD(lr=epsilon)` (no momentum) step is exactly
`theta += epsilon * (mean_t(phi_t) - theta)`: the serial version with a meta-batch of one, the
batched version with more. Any other outer optimizer (Adam: "Reptile with Adam outer") takes the
same direction as its gradient.

Execution (`plan(batch)`, `functional.planner`): the tasks of a meta-batch (or of an evaluation
batch) fine-tune together, as one grouped-convolution graph where the forward is a conv /
BatchNorm / ReLU / pool / Linear chain (`functional.task_batched`; 1.6x faster than task by task
with the strided Conv4, one thread), one call per task for any other module; the same numbers
either way, to rounding. The meta-gradient is the engine's Reptile rule,
`functional.rules.reptile_direction`.

Randomness: training draws the mini-batch order from torch's global generator (seeded by the
experiment, saved in checkpoints); evaluation (`adapt`, `task_metrics`) draws it from a generator
seeded with `shuffle_seed` for every task, so an evaluated episode is a pure function of itself.

Inner Adam state: `inner_state="fresh"` starts Adam's moments at zero for every task (tasks are
independent of each other and of their order). `inner_state="persistent"` is the authors' code
(github.com/openai/supervised-reptile restores only the weights after a task): the moments and step
count run on from task to task and across outer steps, and evaluation starts every task from them
without changing them (`CarriedAdamState`, saved in checkpoints with the weights). Measured here
(2000 outer steps of the 5-way 1-shot recipe, 200 test episodes; docs/methods/reptile.md): 79.8%
fresh, 86.0% persistent.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import AdamState, GradientTransformation, LossFn, Params, adam, adapt, loss_with_grads, momentum, sgd
from ..functional.optim import find_state, per_task, replace_state
from ..functional.planner import Plan, plan_independent_tasks
from ..functional.rules import reptile_direction
from ..functional.task_batched import BatchedForward, looped_forward, per_task_losses, stacked_params, task_batched_forward
from .base import AdaptedModel, Learner
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["CarriedAdamState", "Reptile", "fine_tune_tasks", "minibatch_order", "reptile_optimizer"]

InnerOptimizerName = Literal["sgd", "momentum", "adam"]
InnerStateMode = Literal["fresh", "persistent"]
INNER_STATES = ("fresh", "persistent")


def minibatch_order(n: int, batch_size: int | None, steps: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Indices of `steps` mini-batches over `n` examples, as the paper's code samples them.

    Shuffled passes over the examples, cut into consecutive batches of `batch_size` (a batch may
    span two passes). `batch_size=None` or `>= n` means every step sees all `n` examples, unshuffled.

    Example:
        >>> [b.tolist() for b in minibatch_order(4, None, 2)]
        [[0, 1, 2, 3], [0, 1, 2, 3]]
        >>> order = minibatch_order(6, 4, 3, torch.Generator().manual_seed(0))
        >>> [len(b) for b in order], sorted(torch.cat(order)[:6].tolist())
        ([4, 4, 4], [0, 1, 2, 3, 4, 5])
    """
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * steps
    passes = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return list(order[: steps * batch_size].view(steps, batch_size))


def fine_tune_tasks(
    run: BatchedForward,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    optimizer: GradientTransformation,
    batch_size: int | None = None,
    generators: Sequence[torch.Generator | None],
    state: Any | None = None,
    keep_graph: bool = False,
) -> tuple[Params, Tensor, Any]:
    """First-order fine-tuning of T tasks at once: `steps` optimizer steps on mini-batches of
    `x (T, N, ...)`, `y (T, N, ...)`, from `params` for every task, no graph kept.

    The engine's one inner loop (`functional.adapt`) without a graph between steps. `run` computes
    all tasks (`functional.task_batched_forward`: one grouped graph; or `looped_forward`: one call
    per task); `optimizer` is a `functional.optim` optimizer, applied to
    each task on its own (`optim.per_task`), starting from `state` (stacked per task, e.g.
    `CarriedAdamState.start`; None: `optimizer.init`, Adam's moments at zero). Task t's
    mini-batches come from `generators[t]` (None: torch's global generator), drawn in task order,
    as fine-tuning task after task would draw them.
    Returns the adapted weights stacked `(T, *p.shape)`, each task's loss on its first
    mini-batch `(T,)`, and the optimizer's final state. With `keep_graph` the steps keep their
    (second-order) graph to `x`: an attack that poisons the support set differentiates through them.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> from fastadapt.functional import adam
        >>> from fastadapt.functional.task_batched import task_batched_forward
        >>> model = Conv4.omniglot(ways=2)
        >>> p = {k: v.detach() for k, v in model.named_parameters()}
        >>> x, y = torch.rand(3, 4, 1, 28, 28), torch.tensor([0, 1, 0, 1]).expand(3, 4)
        >>> phi, first, _ = fine_tune_tasks(task_batched_forward(model), p, x, y, steps=2, optimizer=adam(1e-3),
        ...                                 loss_fn=torch.nn.functional.cross_entropy, generators=[None] * 3)
        >>> phi["head.weight"].shape, first.shape
        (torch.Size([3, 2, 64]), torch.Size([3]))
    """
    tasks, n = x.shape[:2]
    if len(generators) != tasks:
        raise ValueError(f"generators: one per task, got {len(generators)} for {tasks} tasks")
    orders = torch.stack([torch.stack(minibatch_order(n, batch_size, steps, g)) for g in generators], 1)  # (steps, T, b)
    orders = orders.to(x.device)
    rows = torch.arange(tasks, device=x.device)[:, None]
    per_task_loss = per_task_losses(loss_fn)

    def minibatch_loss(point: Params, step: int) -> Tensor:
        index = orders[step]
        return per_task_loss(run(point, x[rows, index]), y[rows, index])

    start = {name: p.detach() for name, p in stacked_params(params, tasks).items()}
    trajectory = adapt(minibatch_loss, start, optimizer=per_task(optimizer), steps=steps, keep_graph=keep_graph,
                       first_order=not keep_graph, state=state)
    return trajectory.points[-1], trajectory.losses[0], trajectory.state


def reptile_optimizer(name: InnerOptimizerName, lr: float,
                      adam_betas: tuple[float, float] = (0.0, 0.999)) -> GradientTransformation:
    """Reptile's inner optimizer by name: "sgd", "momentum" (beta 0.9) or "adam" (the paper's beta1 = 0).

    Example:
        >>> find_state(reptile_optimizer("adam", 1e-3).init({"w": torch.zeros(1)}), AdamState).count
        0
    """
    if name == "adam":
        return adam(lr, betas=adam_betas)
    if name not in ("sgd", "momentum"):
        raise ValueError(f"inner_optimizer must be 'sgd', 'momentum' or 'adam', got {name!r}")
    return sgd(lr) if name == "sgd" else momentum(lr)


class CarriedAdamState(nn.Module):
    """The inner Adam's moments and step count, carried from task to task (`inner_state="persistent"`).

    The authors' TensorFlow code restores only the model's weights after a task, so Adam's state runs
    on: task after task, outer step after outer step; evaluation starts every task from it and
    restores it afterwards. Here `start(T, optimizer)` hands T tasks the optimizer's state with the
    carried moments and count in its `AdamState` (`scale_by_adam`'s), and `carry(final)` absorbs
    their final states as if they had run one after another: each moment decays by
    `beta ** (K * T)` and adds every task's own contribution, `final_t - beta ** K * start`, weighted
    by the decay of the tasks after it (K inner steps per task). With one task per outer step (the
    serial version) this is exactly the authors' state; with T tasks run at once, each task misses
    the contributions of the tasks before it in its own steps (a few per cent of the second moment
    for the recipes' 5 x 5 steps, with beta2 = 0.999), and its bias correction counts from the
    carried count rather than after them (negligible once the count is in the thousands). Buffers,
    so checkpoints save it; the parameters it tracks are fixed at construction.

    Example:
        >>> state = CarriedAdamState({"w": torch.zeros(2)}, betas=(0.0, 0.999))
        >>> start = state.start(3, reptile_optimizer("adam", 1e-3))
        >>> moments = find_state(start, AdamState)
        >>> moments.count, moments.nu["w"].shape
        (0, torch.Size([3, 2]))
        >>> state.carry(replace_state(start, AdamState(5, moments.mu, {"w": torch.ones(3, 2)})))
        >>> int(state.count)
        15
    """

    def __init__(self, params: Params, betas: tuple[float, float]) -> None:
        super().__init__()
        self.betas = (float(betas[0]), float(betas[1]))
        self.names = list(params)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.mu, self.nu = nn.Module(), nn.Module()
        if len({_buffer_name(name) for name in params}) != len(params):
            raise ValueError(f"parameter names {self.names} collide once '.' becomes '__'; rename the parameters")
        for store in (self.mu, self.nu):
            for name, p in params.items():
                store.register_buffer(_buffer_name(name), torch.zeros_like(p))
        self._handed_out: tuple[int, int] | None = None  # (count, tasks) of the last `start`

    def _moments(self, store: nn.Module) -> Params:
        return {name: getattr(store, _buffer_name(name)) for name in self.names}

    def start(self, tasks: int, optimizer: GradientTransformation) -> Any:
        """`optimizer`'s initial state for `tasks` tasks with the carried Adam state in it, one copy per
        task `(tasks, *p.shape)`."""
        def stack(store: nn.Module) -> Params:
            return {n: v.expand(tasks, *v.shape).clone() for n, v in self._moments(store).items()}
        carried = AdamState(int(self.count), stack(self.mu), stack(self.nu))
        state = replace_state(per_task(optimizer).init(carried.mu), carried)
        self._handed_out = (int(self.count), tasks)
        return state

    @torch.no_grad()
    def carry(self, final_state: Any) -> None:
        """Absorbs the final optimizer states of the tasks the last `start` was handed out to (their
        `AdamState`), in task order (once)."""
        final = find_state(final_state, AdamState)
        got_tasks = next(iter(final.nu.values())).shape[0]
        if self._handed_out != (int(self.count), got_tasks) or final.count <= int(self.count):
            raise RuntimeError(f"carry() takes the final state of the tasks of the last start() (count, tasks) = "
                               f"{self._handed_out}, after at least one step; got count {final.count} for "
                               f"{got_tasks} tasks")
        steps, tasks = final.count - int(self.count), got_tasks
        self._handed_out = None
        for store, beta, after in ((self.mu, self.betas[0], final.mu), (self.nu, self.betas[1], final.nu)):
            later_decay = torch.tensor([beta ** (steps * (tasks - 1 - t)) for t in range(tasks)],
                                       dtype=torch.float64)
            for name, carried in self._moments(store).items():
                own = after[name] - beta ** steps * carried
                weights = later_decay.to(own).view(-1, *[1] * carried.dim())
                carried.mul_(beta ** (steps * tasks)).add_((weights * own).sum(0))
        self.count += steps * tasks


def _buffer_name(parameter: str) -> str:
    return parameter.replace(".", "__")


class Reptile(Learner):
    """Reptile over any `nn.Module`: its parameters are the meta-learned initialisation.

    Args:
        model: any module (for classification, with a `ways`-sized output).
        inner_lr: inner optimizer step size (the paper: Adam, 1e-3 for 5-way Omniglot).
        inner_steps: inner mini-batch steps per task in training.
        inner_optimizer: "sgd", "momentum" or "adam" (first order; the paper: Adam with beta1 = 0).
        inner_batch: mini-batch size of the inner loop; None: the whole support set every step.
        eval_inner_steps: steps when adapting at test time (the paper: 50); None: `inner_steps`.
        eval_inner_batch: mini-batch size at test time; None: `inner_batch`.
        adam_betas: the inner Adam's (beta1, beta2).
        inner_state: "fresh" (Adam's moments start at zero for every task) or "persistent" (carried
            across tasks and into evaluation, as the authors' code: `CarriedAdamState`; Adam only).
        task: "classification" (cross-entropy) or "regression" (MSE).
        shuffle_seed: seed of the mini-batch order at test time, the same for every task.

    Example:
        >>> from fastadapt.nn import MLP
        >>> from fastadapt.data import SinusoidTasks
        >>> reptile = Reptile(MLP(), inner_lr=0.02, inner_steps=5, inner_optimizer="sgd", task="regression")
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=0.1)  # epsilon of the paper
        >>> loss, metrics = reptile.meta_loss(SinusoidTasks().task_batch(0, 4))
        >>> loss.backward(); opt.step()  # theta += 0.1 * (mean phi - theta)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        *,
        inner_optimizer: InnerOptimizerName = "adam",
        inner_batch: int | None = None,
        eval_inner_steps: int | None = None,
        eval_inner_batch: int | None = None,
        adam_betas: tuple[float, float] = (0.0, 0.999),
        inner_state: InnerStateMode = "fresh",
        task: TaskKind = "classification",
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        _check_count("inner_steps", inner_steps, optional=False)
        for name, value in (("eval_inner_steps", eval_inner_steps), ("inner_batch", inner_batch),
                            ("eval_inner_batch", eval_inner_batch)):
            _check_count(name, value, optional=True)
        self.inner_opt = reptile_optimizer(inner_optimizer, inner_lr, adam_betas)  # checks all three
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.inner_optimizer: InnerOptimizerName = inner_optimizer
        self.inner_batch = inner_batch
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.eval_inner_batch = eval_inner_batch if eval_inner_batch is not None else inner_batch
        self.task = check_kind(task)
        self.shuffle_seed = shuffle_seed
        if inner_state not in INNER_STATES:
            raise ValueError(f"inner_state must be one of {', '.join(map(repr, INNER_STATES))}, got {inner_state!r}")
        if inner_state == "persistent" and inner_optimizer != "adam":
            raise ValueError(f"inner_state 'persistent' carries Adam's moments across tasks; inner_optimizer is "
                             f"{inner_optimizer!r} (use inner_optimizer='adam' or inner_state='fresh')")
        self.inner_state: InnerStateMode = inner_state
        self.carried_state = CarriedAdamState(self._theta(), adam_betas) if inner_state == "persistent" else None

    def _start_state(self, tasks: int) -> Any | None:
        """Where the inner optimizer starts for `tasks` tasks: with the carried Adam state, or fresh (None)."""
        return None if self.carried_state is None else self.carried_state.start(tasks, self.inner_opt)

    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target)

    def plan(self, batch: TaskBatch) -> Plan:
        """How the tasks of `batch` fine-tune now, and why (`functional.planner`): all at once as one
        grouped graph where the forward is a conv/BatchNorm/ReLU/pool/Linear chain, else task by task.

        Example:
            >>> from fastadapt.nn import MLP
            >>> from fastadapt.data import SinusoidTasks
            >>> Reptile(MLP(), task="regression").plan(SinusoidTasks().task_batch(0, 2)).path
            'per-task'
        """
        return plan_independent_tasks(self.model, batch, task_group=len(batch))

    def _run(self, plan: Plan) -> BatchedForward:
        """The forward of stacked tasks the plan asks for: one grouped graph, or one call per task."""
        grouped = task_batched_forward(self.model) if plan.path == "task-groups" else None
        return grouped or looped_forward(self.model)

    def _eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shuffle_seed)

    def _theta(self) -> Params:
        """The trainable meta-parameters, detached: what the inner loop adapts (frozen ones stay the module's)."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Fine-tunes on one task's support set (`eval_inner_steps`, `eval_inner_batch`; from the carried
        Adam state with `inner_state="persistent"`, which it leaves as it was); returns the predictor.
        Differentiable w.r.t. `support_x` when it requires grad.

        Example:
            >>> from fastadapt.nn import Conv4
            >>> learner = Reptile(Conv4.omniglot(ways=5), eval_inner_steps=2).adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        run = self._run(self.plan(TaskBatch(support_x[None], support_y[None], support_x[None], support_y[None])))
        phi, _, _ = self._fine_tune_tasks(run, self._theta(), support_x[None], support_y[None],
                                          steps or self.eval_inner_steps, self.eval_inner_batch, [self._eval_generator()],
                                          keep_graph=support_x.requires_grad)
        return AdaptedModel(self.model, {name: p[0] for name, p in phi.items()})

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The Reptile direction for the batch, as a loss to call `backward()` on, and metrics.

        `loss.backward()` deposits `theta - mean_t(phi_t)` in the trainable parameters. With
        `inner_state="persistent"` it also advances the carried Adam state: call it once per outer step. The loss
        value (and metric `loss`, `accuracy`) is the mean query loss after adaptation, for
        monitoring; `support_loss` is the loss on each task's first inner mini-batch.
        """
        theta = self._theta()
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]  # theta's order
        generators = [None] * len(batch)  # torch's global generator, drawn task after task
        run = self._run(self.plan(batch))
        phi, support_losses, final_state = self._fine_tune_tasks(run, theta, batch.support_x, batch.support_y,
                                                                 self.inner_steps, self.inner_batch, generators)
        if self.carried_state is not None:
            self.carried_state.carry(final_state)
        with torch.no_grad():
            metrics = self._metrics(run, phi, batch.query_x, batch.query_y)
        metrics = {k: v.mean() for k, v in {**metrics, "support_loss": support_losses}.items()}
        direction = reptile_direction(theta, phi, [name for name, _ in named])
        return loss_with_grads(metrics["loss"], [p for _, p in named], direction), metrics

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """Also `loss_before`, the query loss before fine-tuning."""
        outputs = self._query_outputs(batch, inner_steps)
        after = [task_metrics(self.task, outputs[t], batch.query_y[t]) for t in range(len(batch))]
        before = self._metrics(self._run(self.plan(batch)), stacked_params(self._theta(), len(batch)), batch.query_x, batch.query_y)
        return {**{k: torch.stack([r[k] for r in after]) for k in after[0]}, "loss_before": before["loss"]}

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """After fine-tuning each task."""
        generators = [self._eval_generator() for _ in range(len(batch))]
        run = self._run(self.plan(batch))
        phi, _, _ = self._fine_tune_tasks(run, self._theta(), batch.support_x, batch.support_y,
                                          inner_steps or self.eval_inner_steps, self.eval_inner_batch, generators)
        return run(phi, batch.query_x)

    def _fine_tune_tasks(self, run: BatchedForward, theta: Params, x: Tensor, y: Tensor, steps: int,
                         batch_size: int | None, generators: Sequence[torch.Generator | None], keep_graph: bool = False,
                         ) -> tuple[Params, Tensor, Any]:
        """Every task's adapted weights `(T, *p.shape)`, first mini-batch losses `(T,)`, final optimizer state."""
        return fine_tune_tasks(run, theta, x, y, loss_fn=self._loss_fn, steps=steps, optimizer=self.inner_opt,
                               batch_size=batch_size, generators=generators, state=self._start_state(x.shape[0]),
                               keep_graph=keep_graph)

    def _metrics(self, run: BatchedForward, params: Params, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-task query metrics `(T,)` of stacked weights `(T, *p.shape)` on `x (T, N, ...)`."""
        outputs = run(params, x)
        rows = [task_metrics(self.task, outputs[t], y[t]) for t in range(x.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _check_count(name: str, value: object, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {value!r}")
