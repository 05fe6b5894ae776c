"""The benchmarked shapes, where they run, and the work one forward+backward of a shape does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moe_parallel import expert_capacity

AUX_LOSS_COEFF = 0.01
# Dense bf16 GEMM rate of an H200 (8192^3 products): the default reference of the TFLOP/s columns.
H200_BF16_TFLOPS = 790.0


@dataclass(frozen=True)
class Target:
    """Where and in what precision every implementation runs: the same for all of them."""

    device: str = "cpu"  # "cpu" or "cuda" (rank r of an EP run uses cuda:r)
    dtype: str = "float32"  # parameters, activations and gradients; our router still computes in fp32
    threads: int | None = None  # torch CPU threads at EP=1 (EP>1 ranks get one each)
    expert_gemm: str = "auto"  # our experts' path: MoEConfig.expert_gemm

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def device_for(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.device == "cuda" else torch.device("cpu")

    def for_config(self, cfg: BenchConfig) -> Target:
        """This target for ``cfg``: on CPU, the ranks of an EP>1 config share the cores, a thread each."""
        return dataclasses.replace(self, threads=1) if cfg.ep_size > 1 and self.device == "cpu" else self

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class BenchConfig:
    """One layer shape: global tokens, hidden and FFN size, experts, top-k, capacity, EP size."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    capacity_factor: float | None  # None: dropless
    ep_size: int = 1
    # Ours only: DeepSpeed's gates have a fixed drop order of their own.
    drop_policy: str = "position"

    def label(self) -> str:
        ep = f", EP={self.ep_size}" if self.ep_size > 1 else ""
        cf = "dropless" if self.capacity_factor is None else f"{self.capacity_factor}"
        policy = f" {self.drop_policy}" if self.drop_policy != "position" and self.capacity_factor is not None else ""
        return f"T={self.tokens} D={self.hidden} F={self.ffn} E={self.experts} k={self.top_k} cf={cf}{policy}{ep}"


def _with_ep2(configs: dict[str, BenchConfig]) -> dict[str, BenchConfig]:
    """Adds ``ep2``: the global batch of ``c1`` on two processes, half of its tokens on each."""
    return {**configs, "ep2": dataclasses.replace(configs["c1"], name="ep2", ep_size=2)}


CONFIGS = _with_ep2(
    {
        "c1": BenchConfig("c1", 4096, 512, 2048, 8, 2, 1.25),
        "c2": BenchConfig("c2", 4096, 512, 256, 64, 8, 1.25),
        "c3": BenchConfig("c3", 16384, 256, 512, 16, 2, 1.25),
        # The layer of a 16B fine-grained MoE model: fills a GPU, named only (--configs ...,large).
        "large": BenchConfig("large", 65536, 2048, 1408, 64, 6, 1.25),
    }
)
QUICK_CONFIGS = _with_ep2(
    {
        "c1": BenchConfig("c1", 256, 64, 128, 8, 2, 1.25),
        "c2": BenchConfig("c2", 256, 64, 32, 64, 8, 1.25),
        "c3": BenchConfig("c3", 512, 32, 64, 16, 2, 1.25),
        "large": BenchConfig("large", 512, 64, 48, 16, 6, 1.25),
    }
)
DEFAULT_CONFIGS = "c1,c2,c3,ep2"


def expert_gemm_flops(cfg: BenchConfig, kept_rows: int) -> float:
    """FLOPs of the expert GEMMs in one forward+backward on ``kept_rows`` routed rows.

    Two GEMMs of ``2 * n * D * F`` forward, twice that backward (input and weight gradients):
    ``12 * n * D * F``. Only kept rows count, for every implementation alike (DeepSpeed's padded
    capacity slots are work it does, not work the layer needs).
    """
    return 12.0 * kept_rows * cfg.hidden * cfg.ffn


def ds_buffer_rows(cfg: BenchConfig, busiest_routed: int = 0) -> int:
    """Rows DeepSpeed's experts compute on: E x capacity (padded), summed over ranks. Dropless, the
    capacity is the busiest expert's load on any rank (``busiest_routed``; 0 when not known)."""
    local_tokens = cfg.tokens // cfg.ep_size
    capacity = expert_capacity(local_tokens, cfg.top_k, cfg.experts, cfg.capacity_factor, 4)
    if capacity is None:
        capacity = min(busiest_routed, local_tokens)
    return cfg.ep_size * cfg.experts * capacity


def runnable_on(configs: list[BenchConfig], device: str) -> list[BenchConfig]:
    """``configs`` without those this machine cannot run: on CUDA, NCCL needs one GPU per EP rank."""
    if device != "cuda":
        return configs
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    too_wide = [c.name for c in configs if c.ep_size > torch.cuda.device_count()]
    if too_wide:
        print(f"skipping {too_wide}: {torch.cuda.device_count()} GPU(s) visible, one per EP rank needed")
    return [c for c in configs if c.name not in too_wide]
