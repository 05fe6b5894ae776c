"""The experts: raw compute on rows grouped by local expert (the dispatcher does all data movement).

- ``interface.py``: what the layer asks of an experts module;
- ``stacked.py``: :class:`GroupedExperts`, stacked ``[e, D, F]`` weights, seeded by global expert id;
- ``grouped.py``: the grouped-GEMM path (GPUs; no host sync; what ``torch.compile`` traces);
- ``loop.py``, ``padded.py``: the two CPU paths (per-expert GEMMs; batched products over padded runs);
- ``choice.py``: which path runs, a deterministic function of the shape and the machine;
- ``buffers.py``: large CPU weight-gradient buffers;
- ``modules.py``: experts built from a user's ``nn.Module`` (the DeepSpeed drop-in's ``expert=``).
"""

from .activations import activate
from .grouped import grouped_gemm_problem, grouped_gemm_supported, grouped_mlp, grouped_mm, grouped_mm_op
from .interface import Experts
from .loop import LoopExpertMLP
from .padded import PaddedExpertMLP, padded_runs, padded_slots
from .stacked import GroupedExperts, expert_seed

__all__ = [
    "Experts",
    "GroupedExperts",
    "LoopExpertMLP",
    "PaddedExpertMLP",
    "activate",
    "expert_seed",
    "grouped_gemm_problem",
    "grouped_gemm_supported",
    "grouped_mlp",
    "grouped_mm",
    "grouped_mm_op",
    "padded_runs",
    "padded_slots",
]
