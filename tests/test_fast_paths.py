"""The fast execution paths give the same numbers as PyTorch's own layers and the reference loop.

- the reordered first conv block (functional.fused_block), to second order;
- BatchNorm -> ReLU -> max-pool pooled before the ReLU (functional.norm_relu_pool);
- the task-batched support phase (functional.task_batched);
- bf16 autocast mode, torch.compile'd query pass, glibc allocator setting.
The float64 meta-gradient comparison of every learner on every path is in test_meta_gradients.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastadapt import MAML, TaskBatch
from fastadapt.algorithms import IMAML
from fastadapt.functional.fused_block import conv_bn_relu_pool, fused_forward, unfused
from fastadapt.functional.norm_relu_pool import norm_relu_pool
from fastadapt.functional.task_batched import task_batched_forward
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory, torch_threads


def _reference_block(x, w, b, gamma, beta):
    return F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, b, padding=w.shape[-1] // 2), None, None, gamma, beta, True)), 2)


@pytest.mark.parametrize("channels,size,kernel", [(1, 28, 3), (3, 20, 3), (1, 9, 3), (2, 12, 5)])
def test_reordered_block_matches_pytorch_layers_to_second_order(channels, size, kernel):
    g = torch.Generator().manual_seed(channels * size)
    x = torch.rand(6, channels, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, channels, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    gamma = (torch.rand(8, generator=g, dtype=torch.float64) * 3 - 1.5).requires_grad_()  # negative scales too
    beta = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(8, channels, kernel, kernel, generator=g, dtype=torch.float64)

    def first_and_second(out):  # gradients w.r.t. the input too (adversarial attacks need them)
        gx, gw, gg, gb = torch.autograd.grad((out ** 3).sum(), [x, w, gamma, beta], create_graph=True)
        return [gx, gw, gg, gb, *torch.autograd.grad((gw * probe).sum() + gx.sum(), [x, w, gamma, beta])]

    ref = _reference_block(x, w, b, gamma, beta)
    out = conv_bn_relu_pool(x, w, gamma, beta)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    for mine, theirs in zip(first_and_second(out), first_and_second(ref)):
        assert (mine - theirs).norm() <= 1e-11 * theirs.norm()


def _norm_relu_pool_inputs(dtype, size, channels_last):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(6, 8, size, size, generator=g, dtype=dtype)
    x[:, :, : size // 2, : size // 2] = 0.5  # a constant region: ties in every pooling window there
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = (torch.rand(8, generator=g, dtype=dtype) * 3 - 1.5).requires_grad_()  # negative scales too
    beta = torch.randn(8, generator=g, dtype=dtype, requires_grad=True)
    return x.requires_grad_(), gamma, beta, torch.randn(8, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size,channels_last", [(14, False), (14, True), (7, False), (3, True)])
def test_pooling_before_the_relu_gives_pytorch_layers_numbers(dtype, size, channels_last):
    """Output and create_graph gradients bit for bit; first-order gradients (BatchNorm's reductions
    over the pooling winners only) and second order to rounding."""
    x, gamma, beta, probe = _norm_relu_pool_inputs(dtype, size, channels_last)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5

    def gradients(out):
        first = torch.autograd.grad((out ** 3).sum(), [x, gamma, beta], retain_graph=True)
        gx, gg, gb = torch.autograd.grad((out ** 3).sum(), [x, gamma, beta], create_graph=True)
        return first, [gx, gg, gb], torch.autograd.grad((gg * probe).sum() + (gx ** 2).sum(), [x, gamma, beta])

    ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, gamma, beta, True)), 2)
    out = norm_relu_pool(x, gamma, beta)
    assert torch.equal(out, ref)
    (first, mine, mine2), (first_ref, theirs, theirs2) = gradients(out), gradients(ref)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    for a, b in [*zip(first, first_ref), *zip(mine2, theirs2)]:
        assert (a - b).norm() <= tolerance * b.norm()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert mine[0].is_contiguous(memory_format=layout) and first[0].is_contiguous(memory_format=layout)


def test_pooling_before_the_relu_takes_inputs_of_any_strides():
    x = torch.randn(6, 8, 14, 14, dtype=torch.float64).transpose(2, 3).requires_grad_()  # neither layout
    gamma, beta = torch.rand(8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64)
    ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, gamma, beta, True)), 2)
    out = norm_relu_pool(x, gamma, beta)
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad((out ** 3).sum(), [x, gamma]), torch.autograd.grad((ref ** 3).sum(), [x, gamma])):
        assert (a - b).norm() <= 1e-12 * b.norm()


def _saved_bytes(block):
    """Bytes of the distinct storages autograd saves for the backward of `block()`."""
    kept = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.setdefault(t.untyped_storage().data_ptr(), t),
                                                  lambda t: t):
        block().sum()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def test_pooling_before_the_relu_keeps_one_full_resolution_map_for_the_backward():
    x, gamma, beta, _ = _norm_relu_pool_inputs(torch.float32, 14, False)
    full = x.numel() * x.element_size()
    ours = _saved_bytes(lambda: norm_relu_pool(x, gamma, beta))
    pytorch = _saved_bytes(lambda: F.max_pool2d(F.relu(F.batch_norm(x, None, None, gamma, beta, True)), 2))
    # BatchNorm's input, plus the pooled output (the next layer's input) and 16-bit indices; PyTorch's
    # layers keep the ReLU's full-resolution output too
    assert ours < 1.5 * full < 2 * full < pytorch


def test_reordered_block_keeps_its_images_not_their_patches_for_the_backward():
    x = torch.rand(20, 1, 28, 28)
    w = torch.randn(64, 1, 3, 3, requires_grad=True)
    gamma, beta = torch.rand(64, requires_grad=True), torch.randn(64, requires_grad=True)
    patches = x.numel() * 9 * x.element_size()
    pooled = 20 * 64 * 14 * 14 * 4  # the block's output (the ReLU keeps it; the next layer's input)
    indices = 20 * 64 * 14 * 14 * 2  # 16-bit pooling indices
    # besides those: the images and small statistics, not the patches
    assert _saved_bytes(lambda: conv_bn_relu_pool(x, w, gamma, beta)) < pooled + indices + patches / 2


def test_reordered_block_keeps_float32_under_bf16_autocast():
    x, w = torch.rand(4, 1, 8, 8), torch.randn(5, 1, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_relu_pool(x, w, torch.ones(5), torch.zeros(5))
    assert out.dtype == torch.float32
    assert torch.allclose(out, _reference_block(x, w, None, torch.ones(5), torch.zeros(5)), atol=1e-5)


def test_fusion_is_used_only_where_recognised_and_can_be_switched_off():
    model = Conv4.omniglot(ways=5)
    assert fused_forward(model) is not None
    assert fused_forward(Conv4.omniglot(ways=5, pooling="stride")) is None  # no max-pool to reorder
    assert fused_forward(Conv4(in_channels=8, ways=5, hidden=8, image_size=16)) is None  # 8*9 > 32 patch entries
    assert fused_forward(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    with unfused():
        assert fused_forward(model) is None
    assert fused_forward(model) is not None


@pytest.mark.parametrize("pooling", ["max", "stride"])
def test_task_batched_forward_equals_one_call_per_task(pooling):
    torch.manual_seed(0)
    models = [Conv4(in_channels=1, ways=3, hidden=6, image_size=16, pooling=pooling) for _ in range(3)]
    stacked = {n: torch.stack([dict(m.named_parameters())[n] for m in models]) for n, _ in models[0].named_parameters()}
    x = torch.rand(3, 4, 1, 16, 16)
    out = task_batched_forward(models[0])(stacked, x)
    for t, m in enumerate(models):
        assert torch.allclose(out[t], m(x[t]), atol=1e-5)


def _batch(tasks=4, ways=5, queries=3, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(torch.rand(tasks, ways, 1, 28, 28, generator=g), ys,
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g), yq)


def _meta_grad(learner, batch):
    learner.zero_grad(set_to_none=True)
    learner.meta_loss(batch)[0].backward()
    return torch.cat([p.grad.flatten() for p in learner.parameters()])


def test_bf16_mode_gives_the_fp32_meta_gradient_to_bf16_precision_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = Conv4.omniglot(ways=5)
    batch = _batch()
    exact = _meta_grad(MAML(model, 0.4, 1), batch)
    mixed_learner = MAML(model, 0.4, 1, precision="bf16")
    mixed = _meta_grad(mixed_learner, batch)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    cosine = F.cosine_similarity(exact, mixed, dim=0)
    assert 0.97 < cosine < 1 - 1e-7, cosine  # close, and really computed in bf16
    assert (mixed - exact).norm() < 0.25 * exact.norm()
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        MAML(model, precision="fp16")


@pytest.mark.parametrize("options", [dict(inner_steps=2), dict(inner_steps=2, first_order=True),
                                     dict(inner_steps=2, checkpoint_inner_loop=True),
                                     dict(inner_steps=2, inner_optimizer="adam", per_step_bn_weights=True)])
def test_task_groups_in_threads_give_the_one_at_a_time_meta_gradient(options):
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=5, hidden=8, image_size=28).double()
    batch = _batch(tasks=6)
    batch = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)
    threads = torch.get_num_threads()
    with torch_threads(1):  # as each worker runs: then no rounding differs, and any race would show
        one_at_a_time = _meta_grad(MAML(model, 0.4, task_group=1, **options), batch)
    in_threads = _meta_grad(MAML(model, 0.4, task_group=1, task_workers=3, **options), batch)
    assert torch.equal(in_threads, one_at_a_time)
    assert torch.get_num_threads() == threads  # the caller's thread count is back


def test_task_workers_are_checked_and_used_only_where_the_plan_can():
    with pytest.raises(ValueError, match="task_workers must be an integer >= 1, got 0"):
        MAML(Conv4.omniglot(ways=5), task_workers=0)
    batch = TaskBatch(torch.rand(4, 5, 1, 28, 28), torch.arange(5).repeat(4, 1), torch.rand(4, 5, 1, 28, 28),
                      torch.arange(5).repeat(4, 1))
    assert MAML(Conv4.omniglot(ways=5), task_workers=2).plan(batch).workers == 2
    for learner in (MAML(Conv4.omniglot(ways=5), task_workers=2, compile=True),         # one compiled pass
                    MAML(Conv4.omniglot(ways=5, pooling="stride"), task_workers=2),   # not a thread-safe forward
                    MAML(Conv4.omniglot(ways=5), task_workers=2, per_step_bn_statistics=True)):  # task by task
        assert learner.plan(batch).workers == 1
    assert IMAML(Conv4.omniglot(ways=5, pooling="stride"), task_workers=2).task_workers == 2


def test_compiled_query_pass_gives_the_eager_meta_gradient():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=5, hidden=8, image_size=28)
    batch = _batch(tasks=2)
    eager = _meta_grad(MAML(model, 0.4, 1), batch)
    compiled = _meta_grad(MAML(model, 0.4, 1, compile=True), batch)
    assert (compiled - eager).norm() <= 1e-4 * eager.norm()


def test_allocator_setting_applies_on_linux():
    assert keep_freed_memory() is True


def test_checkpointed_inner_loop_of_a_model_without_the_batched_path_is_exact():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                                    torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
        g = torch.Generator().manual_seed(1)
        batch = TaskBatch(torch.rand(2, 6, 1, 8, 8, generator=g), torch.arange(3).repeat(2).expand(2, -1).contiguous(),
                          torch.rand(2, 9, 1, 8, 8, generator=g), torch.arange(3).repeat(3).expand(2, -1).contiguous())
        kept = _meta_grad(MAML(model, 0.3, 3), batch)
        rebuilt = _meta_grad(MAML(model, 0.3, 3, checkpoint_inner_loop=True), batch)
        graph = _meta_grad(MAML(model, 0.3, 3, execution="graph"), batch)
    finally:
        torch.set_default_dtype(torch.float32)
    assert (rebuilt - graph).norm() <= 1e-12 * graph.norm()
    assert (kept - graph).norm() <= 1e-12 * graph.norm()


def test_strided_conv4_is_the_reptile_papers_network():
    model = Conv4.omniglot(ways=5, pooling="stride")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.features)
    assert model.features(torch.zeros(2, 1, 28, 28)).shape == (2, 256)  # 28 -> 14 -> 7 -> 4 -> 2, 64 maps
    with pytest.raises(ValueError, match="pooling must be 'max' or 'stride', got 'avg'"):
        Conv4.omniglot(pooling="avg")  # type: ignore[arg-type]
