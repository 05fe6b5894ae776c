"""Pooled CPU gradient buffers: ordinary tensors, taken over as gradients, handed out again only when no
tensor holds them, released on request, and the expert paths built on them still equal the oracle,
step after step."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.experts import buffers
from moe_parallel.experts.buffers import grad_buffer_like
from tests.reference import naive_moe

ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(autouse=True)
def glibc_defaults(monkeypatch):
    """Whatever the environment the suite runs in: glibc's defaults, which keep no large block."""
    monkeypatch.setattr(buffers, "process_environ", lambda: {})


@pytest.fixture(params=["pool on huge pages", "pool on the heap", "fresh mappings"])
def every_buffer_pooled(monkeypatch, request):
    """Send every buffer, however small, down the large-buffer path: through the pool (on mappings
    where the kernel offers huge pages, and on plain ``torch.empty`` storage) or, with the pool off
    (the default), a fresh mapping each."""
    monkeypatch.setattr(buffers, "POOLED_BUFFER_MIN_BYTES", 1)
    huge = request.param != "pool on the heap" and buffers._HUGE_PAGE_ADVICE is not None
    monkeypatch.setattr(buffers, "HUGE_PAGES_AVAILABLE", huge)
    monkeypatch.setattr(buffers, "_pool", [])
    monkeypatch.setattr(buffers, "_pool_enabled", request.param != "fresh mappings")
    return request.param


@pytest.fixture
def pool_on(monkeypatch):
    monkeypatch.setattr(buffers, "_pool", [])
    monkeypatch.setattr(buffers, "_pool_enabled", True)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (7, 3, 11), (2, 1 << 20)])
def test_buffers_behave_like_torch_empty(every_buffer_pooled, shape, dtype) -> None:
    ref = torch.ones(shape, dtype=dtype)
    empty = grad_buffer_like(ref)
    assert empty.shape == ref.shape and empty.dtype == dtype and empty.is_contiguous()
    empty.copy_(ref)  # writable
    assert torch.equal(empty, ref)
    buf = io.BytesIO()
    torch.save(empty, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), ref)


def test_a_buffer_is_handed_out_again_only_when_no_tensor_holds_it(every_buffer_pooled) -> None:
    if every_buffer_pooled == "fresh mappings":
        pytest.skip("the pool is off")
    ref = torch.empty(3, 5)
    first = grad_buffer_like(ref)
    ptr = first.data_ptr()
    second = grad_buffer_like(ref)
    assert second.data_ptr() != ptr  # first is alive: never shared
    view = first[1:]
    del first
    assert grad_buffer_like(ref).data_ptr() not in (ptr, second.data_ptr())  # a view keeps it busy
    del view
    again = grad_buffer_like(torch.empty(5, 3))  # same size, any shape
    assert again.data_ptr() == ptr
    assert grad_buffer_like(torch.empty(4, 5)).data_ptr() not in (ptr, second.data_ptr())  # other sizes: new
    assert buffers.cached_bytes() == (2 * 60, 60 + 80)  # in use: first (again) and second


@pytest.mark.parametrize("pooled", [True, False])
def test_large_buffers_map_afresh_unless_the_pool_is_on(monkeypatch, pooled: bool) -> None:
    if not buffers.HUGE_PAGES_AVAILABLE:
        pytest.skip("this kernel offers no transparent huge pages")
    monkeypatch.setattr(buffers, "_pool", [])
    monkeypatch.setattr(buffers, "_pool_enabled", buffers._pool_enabled)  # restored afterwards
    buffers.set_gradient_pool(pooled)
    try:
        ref = torch.empty(buffers.POOLED_BUFFER_MIN_BYTES // 4 * 2)  # 64 MiB of float32
        start = _rss_mib()
        for _ in range(6):  # 384 MiB in all if nothing were freed or recycled
            buf = grad_buffer_like(ref)
            assert buf.untyped_storage().data_ptr() % 4096 == 0  # a mapping of its own, not heap memory
            buf.fill_(1.0)
            del buf
        assert _rss_mib() - start < 2 * 64
        assert buffers.cached_bytes() == ((0, 64 << 20) if pooled else (0, 0))
    finally:
        buffers.set_gradient_pool(False)
    assert buffers.cached_bytes() == (0, 0)  # turning it off released the idle buffer


def test_large_buffers_are_recycled_and_released_on_request(pool_on) -> None:
    if not buffers.HUGE_PAGES_AVAILABLE:
        pytest.skip("this kernel offers no transparent huge pages")
    ref = torch.empty(buffers.POOLED_BUFFER_MIN_BYTES // 4 * 2)  # 64 MiB of float32
    start = _rss_mib()
    ptrs = set()
    for _ in range(12):  # 768 MiB in all if nothing were recycled
        buf = grad_buffer_like(ref)
        assert buf.untyped_storage().data_ptr() % 4096 == 0  # a mapping of its own, not heap memory
        buf.fill_(1.0)
        ptrs.add(buf.data_ptr())
        del buf
    assert len(ptrs) == 1 and _rss_mib() - start < 2 * 64
    assert buffers.cached_bytes() == (0, 64 << 20)
    assert buffers.release_cached_buffers() == 64 << 20
    assert buffers.cached_bytes() == (0, 0) and _rss_mib() - start < 32


GIB, MIB = 1 << 30, 1 << 20


@pytest.mark.parametrize(
    "env, nbytes, keeps",
    [
        ({}, 64 * MIB, False),  # glibc's defaults: above 32 MiB every block is a fresh mapping
        ({"MALLOC_MMAP_THRESHOLD_": str(4 * GIB), "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)}, 64 * MIB, True),
        ({"MALLOC_MMAP_THRESHOLD_": str(4 * GIB), "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)}, 8 * GIB, False),
        ({"MALLOC_MMAP_THRESHOLD_": str(4 * GIB)}, 64 * MIB, False),  # kept off mmap, but trimmed when freed
        ({"MALLOC_TRIM_THRESHOLD_": str(4 * GIB)}, 64 * MIB, False),  # still a mapping
        ({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 * GIB)}, 64 * MIB, True),  # mmap off
        ({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}, 64 * MIB, False),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0x100000000:glibc.malloc.trim_threshold=0x1000000000"},
            64 * MIB,
            True,
        ),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967296", "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)},
            64 * MIB,
            True,
        ),  # the two ways mix
        (
            {
                "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536",
                "MALLOC_MMAP_THRESHOLD_": str(4 * GIB),
                "MALLOC_TRIM_THRESHOLD_": str(64 * GIB),
            },
            64 * MIB,
            False,
        ),  # the tunable wins, as in glibc
        ({"MALLOC_MMAP_THRESHOLD_": "lots", "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)}, 64 * MIB, False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, 64 * MIB, True),
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, 8 * GIB, True),
        ({"LD_PRELOAD": "libfaketime.so.1"}, 64 * MIB, False),
    ],
)
def test_allocator_keeps_reads_the_allocator_configuration(env, nbytes, keeps) -> None:
    assert buffers.allocator_keeps(nbytes, env) is keeps


def test_a_size_the_allocator_keeps_comes_from_it_not_from_the_pool(monkeypatch, pool_on) -> None:
    keeping = {"MALLOC_MMAP_THRESHOLD_": str(4 * GIB), "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)}
    monkeypatch.setattr(buffers, "process_environ", lambda: keeping)
    ref = torch.ones(buffers.POOLED_BUFFER_MIN_BYTES // 4 * 2)  # 64 MiB of float32
    buf = grad_buffer_like(ref)
    assert buf.shape == ref.shape and buf.is_contiguous()
    buf.copy_(ref)
    assert torch.equal(buf, ref) and buffers.cached_bytes() == (0, 0)


_FAULTS_PER_BUFFER = """
import resource, torch
from moe_parallel.experts.buffers import grad_buffer_like
ref = torch.empty(16 << 20)  # 64 MiB of float32
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = grad_buffer_like(ref); buf.fill_(1.0); del buf
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""

_READS_THE_STARTUP_ENVIRONMENT = """
import os
from moe_parallel.experts.buffers import allocator_keeps
before = allocator_keeps(64 << 20)
os.environ.update(MALLOC_MMAP_THRESHOLD_="0", MALLOC_TRIM_THRESHOLD_="0", LD_PRELOAD="")
print(before, allocator_keeps(64 << 20))
"""


def _run_child(code: str, keeps: bool) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, started under glibc's defaults or told to keep large blocks
    (the sweep's environment), with the pool off."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if keeps:
        env.update(MALLOC_MMAP_THRESHOLD_=str(4 * GIB), MALLOC_TRIM_THRESHOLD_=str(64 * GIB))
    env["MOE_PARALLEL_GRAD_POOL"] = "0"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("keeps", [True, False])
def test_the_configuration_is_the_one_the_process_started_with(keeps: bool) -> None:
    """glibc reads its settings once, at startup: so does allocator_keeps, whatever os.environ says later."""
    run = _run_child(_READS_THE_STARTUP_ENVIRONMENT, keeps)
    assert run.stdout.split() == [str(keeps), str(keeps)]


@pytest.mark.parametrize("keeps", [True, False])
def test_a_configured_allocator_hands_freed_gradient_memory_back_warm(keeps: bool) -> None:
    """Under glibc told to keep large blocks, freed 64 MiB gradient buffers come back without page
    faults; under its defaults (pool off), every one is faulted in again."""
    faults = [int(n) for n in _run_child(_FAULTS_PER_BUFFER, keeps).stdout.split()]
    # 64 MiB is 16,384 pages of 4 KiB, or 32 huge pages. glibc may place the first few buffers at new
    # heap addresses (a small block splits a freed one) before it settles on a warm one.
    if keeps:
        # The kernel may take pages back from any process while the machine is busy (compaction,
        # reclaim): one more fresh child tells that apart from an allocator that returns the memory.
        tries = [faults]
        while not all(n < 32 for n in tries[-1][-6:]) and len(tries) < 3:
            tries.append([int(n) for n in _run_child(_FAULTS_PER_BUFFER, keeps).stdout.split()])
        assert all(n < 32 for n in tries[-1][-6:]), tries
    else:
        assert all(n >= (32 if buffers.HUGE_PAGES_AVAILABLE else 16384) for n in faults), faults


def test_a_mapped_buffer_is_an_ordinary_gradient(every_buffer_pooled) -> None:
    weight = torch.nn.Parameter(torch.randn(4, 6, 5))

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w * 3.0

        @staticmethod
        def backward(ctx, grad):
            out = grad_buffer_like(grad)
            out.copy_(grad * 3.0)
            return out

    Scale.apply(weight).sum().backward()
    taken = weight.grad.data_ptr()  # autograd took the buffer over (no copy)
    Scale.apply(weight).sum().backward()  # the second backward accumulates into it
    assert weight.grad.data_ptr() == taken
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 6.0))
    torch.optim.SGD([weight], lr=0.1).step()


def _layer_and_oracle(
    rng: random.Random, path: str, seed: int, experts: tuple, max_top_k: int, capacities: tuple
) -> tuple[MoELayer, MoELayer]:
    """A random small fp64 layer on expert path ``path`` and a loop-path copy of it (the oracle's)."""
    num_experts = rng.choice(experts)
    kwargs = dict(
        hidden_size=rng.choice([4, 8]),
        ffn_hidden_size=rng.choice([3, 16]),
        num_experts=num_experts,
        top_k=rng.randint(1, min(num_experts, max_top_k)),
        capacity_factor=rng.choice(capacities),
        expert_bias=rng.random() < 0.5,
        init_std=0.4,
    )
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(expert_gemm=path, **kwargs)).double().train()
    oracle = MoELayer(MoEConfig(expert_gemm="loop", **kwargs)).double().train()
    oracle.load_state_dict(layer.state_dict())
    return layer, oracle


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", ["loop", "padded"])
def test_expert_paths_on_mapped_buffers_equal_the_oracle(every_buffer_pooled, path: str, seed: int) -> None:
    rng = random.Random(seed)
    layer, oracle = _layer_and_oracle(rng, path, seed, experts=(2, 4, 8), max_top_k=3, capacities=(1.0, None))
    x = torch.randn(rng.choice([5, 33]), layer.config.hidden_size, dtype=torch.float64)
    grad = torch.randn_like(x)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (layer(x_ours) * grad).sum().backward()
    y_ref, aux_ref = naive_moe(oracle, x_ref)
    ((y_ref * grad).sum() + aux_ref).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for p, q in zip(layer.experts.parameters(), oracle.experts.parameters()):
        torch.testing.assert_close(p.grad, torch.zeros_like(q) if q.grad is None else q.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("path", ["loop", "padded"])
def test_recycled_gradients_stay_right_over_steps_and_accumulation(every_buffer_pooled, path: str, seed: int) -> None:
    """Steps that drop their gradients (set_to_none) and steps that accumulate into them: a recycled
    buffer must never be one that a live gradient still uses."""
    rng = random.Random(100 + seed)
    layer, oracle = _layer_and_oracle(rng, path, seed, experts=(2, 4), max_top_k=4, capacities=(1.25, None))
    for accumulate in (False, False, True, True, False):
        if not accumulate:
            layer.zero_grad(set_to_none=True)
            oracle.zero_grad(set_to_none=True)
        x = torch.randn(rng.choice([6, 21]), layer.config.hidden_size, dtype=torch.float64)
        grad = torch.randn_like(x)
        (layer(x) * grad).sum().backward()
        y_ref, aux_ref = naive_moe(oracle, x)
        ((y_ref * grad).sum() + aux_ref).backward()
        for p, q in zip(layer.experts.parameters(), oracle.experts.parameters()):
            expected = torch.zeros_like(q) if q.grad is None else q.grad
            torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-10)
        held = [p.grad.data_ptr() for p in layer.experts.parameters()]
        assert len(set(held)) == len(held)  # no two live gradients share a buffer
