"""``GroupedExperts``: this rank's local experts as one module with stacked ``[e, D, F]`` weights.

Raw compute: rows arrive grouped by local expert (the dispatcher gathers, permutes and combines,
and applies the combine weights), and each expert's MLP runs on its block of rows by one of three
paths: the grouped GEMM (``grouped.py``), the per-expert loop (``loop.py``) or batched products over
padded runs (``padded.py``), as ``choice.py`` resolves it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.config import Activation, ExpertGemm
from .activations import SwiGLUClamp, up_width
from .grouped import grouped_gemm_problem, grouped_gemm_supported, grouped_mlp, grouped_mm_op
from .interface import host_counts
from .loop import LoopExpertMLP
from .padded import PaddedExpertMLP


def expert_seed(init_seed: int, layer_number: int, global_expert_id: int) -> int:
    """Seed of one expert's initialisation: depends on its *global* id, never on the EP layout."""
    return (init_seed * 1_000_003 + layer_number * 10_007 + global_expert_id) % (2**63 - 1)


class GroupedExperts(nn.Module):
    """The ``num_local_experts`` experts held by this rank, weights stacked as ``[e, D, F]``.

    ``first_expert_id`` is the global id of local expert 0; each expert's initialisation is seeded by
    its global id, so the same model results from any expert-parallel layout. ``w1`` is drawn with
    ``init_std``, ``w2`` (the projection back into the residual stream) with ``output_init_std``
    (default ``init_std``; Megatron scales it by ``1/sqrt(2 * num_layers)``).

    ``expert_gemm`` picks the path: ``"grouped"``, ``"loop"``, ``"padded"``, or ``"auto"``, which
    :meth:`resolve_path` turns into one of them once (the grouped GEMM on a CUDA GPU where it runs,
    else the cost model's choice for a balanced step), so a run never changes kernels mid-way.
    Under ``torch.compile`` the grouped GEMM runs whatever the setting: the other paths need the
    row counts on the host.
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: Activation = "gelu",
        bias: bool = False,
        first_expert_id: int = 0,
        init_std: float = 0.02,
        init_seed: int = 1234,
        layer_number: int = 0,
        output_init_std: float | None = None,
        expert_gemm: ExpertGemm = "auto",
        swiglu_limit: float = 7.0,
        swiglu_alpha: float = 1.702,
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.clamp = SwiGLUClamp(float(swiglu_limit), float(swiglu_alpha))  # used by clamped_swiglu only
        self.expert_gemm = expert_gemm
        self.resolved_gemm: str | None = expert_gemm if expert_gemm in ("loop", "padded") else None
        self.first_expert_id = first_expert_id
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std
        self.init_seed = init_seed
        self.layer_number = layer_number
        # The caller consumes the output alone (MoELayer's dispatcher): the backward may write the
        # input gradient over the output gradient.
        self.owns_output_grad = False
        up_size = up_width(activation, ffn_hidden_size)
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden_size, up_size))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.empty(num_local_experts, up_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_local_experts, hidden_size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.w1.is_meta:  # nothing to fill: a meta build (loading, planning) only needs the shapes
            return
        for j in range(self.num_local_experts):
            gen = torch.Generator().manual_seed(
                expert_seed(self.init_seed, self.layer_number, self.first_expert_id + j)
            )
            for param, std in ((self.w1, self.init_std), (self.w2, self.output_init_std)):
                param[j].copy_(torch.empty(param.shape[1:]).normal_(0.0, std, generator=gen))
            for param in (self.b1, self.b2):
                if param is not None:
                    param[j].zero_()

    def resolve_path(self, x: Tensor, rows_per_expert: int) -> str:
        """Fix the path of ``expert_gemm="auto"`` for activations like ``x`` (device, dtype), given the
        rows a balanced step gives each local expert; a forced path is checked and kept. The path
        then holds until the module moves (``.to()``), when ``auto`` resolves again."""
        if self.resolved_gemm is None:
            self.resolved_gemm = self._path_for(x, rows_per_expert)
        return self.resolved_gemm

    def _path_for(self, x: Tensor, rows_per_expert: int) -> str:
        sizes = (self.w1.shape[1], self.w1.shape[2], self.w2.shape[1])
        if self.expert_gemm == "grouped":
            problem = grouped_gemm_problem(x, sizes)
            if problem is not None:
                raise ValueError(
                    f"moe.expert_gemm='grouped' cannot run here: torch's grouped GEMM {problem}; "
                    "use expert_gemm='auto' or 'loop'"
                )
            return "grouped"
        if grouped_gemm_supported(x, sizes):
            return "grouped"
        if x.is_cuda:
            return "loop"
        from .choice import choose_expert_path  # here: `python -m moe_parallel.experts.choice` runs it afresh

        counts = [max(1, rows_per_expert)] * self.num_local_experts
        return choose_expert_path(counts, self.w1.shape[1], self.w2.shape[1], self.activation, x.dtype)

    def _apply(self, fn, recurse: bool = True):
        if self.expert_gemm in ("auto", "grouped"):  # another device or dtype: resolve (and check) again
            self.resolved_gemm = None
        return super()._apply(fn, recurse)

    def execution_path(self, x: Tensor) -> str:
        """``"grouped"``, ``"padded"`` or ``"loop"``: how a forward on ``x`` runs. Before the path is
        resolved, the path a forward on ``x`` alone would resolve (nothing is fixed by asking)."""
        if torch.compiler.is_compiling():
            return "grouped"
        if self.resolved_gemm is not None:
            return self.resolved_gemm
        return self._path_for(x, self._rows_per_expert(x))

    def _rows_per_expert(self, x: Tensor) -> int:
        return max(1, x.shape[0] // max(1, self.num_local_experts))

    def needs_host_counts(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` reads the rows per expert on the host (every path but the grouped GEMM)."""
        return self.execution_path(x) != "grouped"

    def uses_grouped_gemm(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` runs the grouped GEMM path (see ``MoEConfig.expert_gemm``)."""
        return self.execution_path(x) == "grouped"

    def forward(self, x: Tensor, tokens_per_expert: Tensor | list[int], counts_host: list[int] | None = None) -> Tensor:
        """Each local expert's MLP on its rows: ``y[i] = mlp_j(x[i])`` for the rows of expert j.

        Rows are grouped by expert: ``tokens_per_expert[j]`` rows for expert j (an int tensor on the
        device, or a list); rows past their sum are padding, whose output is zero. ``counts_host``:
        the same counts already on the host (a caller that read them spares a second read).
        """
        # Under autocast or mixed dtypes, compute in the activations' dtype; grads flow back through the cast.
        params = [None if p is None else p.to(x.dtype) for p in (self.w1, self.w2, self.b1, self.b2)]
        if self.resolved_gemm is None and not torch.compiler.is_compiling():
            self.resolve_path(x, self._rows_per_expert(x))  # used alone, not inside a layer
        path = self.execution_path(x)
        if path == "grouped":
            counts_e = tokens_per_expert
            if not isinstance(counts_e, Tensor):
                counts_e = torch.tensor(counts_e, dtype=torch.int64, device=x.device)
            with torch.autocast(x.device.type, enabled=False):
                return grouped_mlp(x, counts_e, *params, self.activation, self.clamp)
        counts = host_counts(self, x, tokens_per_expert, counts_host)
        mlp = LoopExpertMLP if path == "loop" or sum(counts) == 0 else PaddedExpertMLP
        return mlp.apply(x.contiguous(), *params, counts, self.activation, self.owns_output_grad, self.clamp)

    def extra_repr(self) -> str:
        e, d, h = self.w1.shape
        return (
            f"experts={e} (first global id {self.first_expert_id}), hidden={d}, up={h}, act={self.activation}, "
            f"gemm={self.expert_gemm}"
        )


__all__ = ["GroupedExperts", "expert_seed", "grouped_mm_op"]
