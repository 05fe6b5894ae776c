"""Configuration of one MoE layer.

A plain dataclass, validated on construction, so that a wrong value fails with the field's name and
what is allowed before any process group is touched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

ScoreFunc = Literal["softmax", "sigmoid"]
DropPolicy = Literal["position", "probs"]
Activation = Literal["gelu", "swiglu", "relu", "silu", "clamped_swiglu"]
GroupScore = Literal["top2_sum", "max"]
RouterNoise = Literal["none", "jitter", "gumbel"]
ExpertGemm = Literal["auto", "grouped", "loop", "padded"]

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs")
ACTIVATIONS = ("gelu", "swiglu", "relu", "silu", "clamped_swiglu")
GROUP_SCORES = ("top2_sum", "max")
ROUTER_NOISES = ("none", "jitter", "gumbel")
EXPERT_GEMMS = ("auto", "grouped", "loop", "padded")


class MoEConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


class MoEInputError(ValueError):
    """The input of an MoE layer is malformed (raised on every rank of the EP group together)."""


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer (not its parallel placement).

    Capacity per expert is ``max(min_capacity, ceil(tokens * top_k / num_experts * factor))`` where
    ``tokens`` is this rank's own token count (as in DeepSpeed: the ragged all-to-all needs no
    agreement on it); ``capacity_factor=None`` means dropless routing.

    ``drop_policy`` orders each expert's queue when it is over capacity: ``"position"`` keeps all
    first choices (in token order) before all second choices (GShard); ``"probs"`` keeps the highest
    combine weights first. Causality in a causal LM under drops (``tests/test_causality.py``): only
    ``"position"`` with ``top_k=1`` is causal. With ``"probs"``, or ``"position"`` and ``top_k >= 2``
    (a later token's first choice outranks an earlier token's second), a later token can evict an
    earlier token's assignment, so in training an earlier position's output can depend on later
    tokens. Dropless routing (``capacity_factor=None``) is always causal.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2

    # Router
    score_func: ScoreFunc = "softmax"
    normalize_top_k: bool = True  # divide the k weights by their sum (for top_k >= 2)
    # Softmax over the k selected logits instead of over all experts (then no renormalising needed;
    # with top_k=1 the weight is exactly 1). Softmax scoring only.
    score_after_topk: bool = False
    # The gate is Linear(D, E, bias=True): logits = x W^T + b, b the router's ``bias`` parameter
    # (GPT-OSS). Unlike selection_bias it enters the scores, hence the combine weights, and is trained.
    router_bias: bool = False
    # Group-limited routing: experts form num_groups equal groups, and each token picks its top_k
    # among the experts of its topk_groups best groups. A group scores by group_score: "top2_sum",
    # the sum of its two best selection scores (DeepSeek-V3), or "max", its best one (DeepSeek-V2's
    # group_limited_greedy). num_groups=1 routes over all experts.
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "top2_sum"
    routed_scaling_factor: float = 1.0  # multiplies the combine weights, after any renormalising
    # A per-expert bias added to the scores for selection only (DeepSeek-V3's correction bias). Kept
    # as the router's ``expert_bias`` buffer; expert_bias_update_rate > 0 implies it and moves it.
    selection_bias: bool = False
    router_noise: RouterNoise = "none"
    router_jitter_eps: float = 1e-2

    # Capacity and dropping
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 4
    drop_policy: DropPolicy = "probs"

    # Balancing
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    expert_bias_update_rate: float = 0.0  # > 0 enables aux-loss-free balancing (DeepSeek-V3)

    # Experts
    # "swiglu" and "clamped_swiglu" split the first product into [gate | up] halves; clamped_swiglu
    # (GPT-OSS) is (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit).
    activation: Activation = "gelu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # Per-expert biases b1 [E, up] and b2 [E, D]: y_e = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e], the
    # combine weight multiplying the whole y_e (GPT-OSS).
    expert_bias: bool = False
    # The combine weight scales the expert's input row instead of its output, and the outputs add up
    # unweighted: y = sum_k expert_k(w_k * x) (Llama 4; Megatron-Core's moe_apply_probs_on_input).
    input_weighted: bool = False
    shared_expert_ffn_hidden_size: int = 0  # 0 disables the always-on shared expert
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ w_gate) (Qwen2-MoE)
    # How the experts' matrix products run: "grouped" (one torch grouped GEMM per product over all
    # local experts; no host sync), "loop" (per-expert GEMMs), "padded" (batched products over
    # padded runs of experts), "auto" (grouped on CUDA in bf16 on SM >= 80; elsewhere loop or
    # padded, as the cost model in experts/choice.py decides once from the layer's shape: never from
    # a timing). torch.compile always traces the grouped GEMM.
    expert_gemm: ExpertGemm = "auto"
    init_std: float = 0.02
    output_init_std: float | None = None  # std of the experts' second weight; None: init_std
    init_seed: int = 1234

    # Integration
    attach_aux_loss: bool = True  # add the aux-loss gradient through the output (see aux_loss.py)
    check_inputs: bool = False  # NaN/Inf checks on the input (a device sync, so off by default)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(name: str, value: Any, allowed: str) -> None:
            raise MoEConfigError(f"moe.{name}={value!r} is invalid: {allowed}")

        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "must be a positive integer")
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts}); lower top_k or add experts")
        if self.score_func not in SCORE_FUNCS:
            fail("score_func", self.score_func, f"choose one of {SCORE_FUNCS}")
        if self.score_after_topk and self.score_func != "softmax":
            fail("score_after_topk", self.score_after_topk, "needs score_func='softmax'; set it to false")
        for name in ("num_groups", "topk_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "must be a positive integer (1: no group-limited routing)")
        if self.num_experts % self.num_groups != 0:
            fail("num_groups", self.num_groups, f"must divide num_experts={self.num_experts}")
        if self.topk_groups > self.num_groups:
            fail("topk_groups", self.topk_groups, f"must be <= num_groups={self.num_groups}")
        reachable = self.topk_groups * (self.num_experts // self.num_groups)
        if self.top_k > reachable:
            fail("top_k", self.top_k, f"must be <= topk_groups * experts per group = {reachable}; raise topk_groups")
        if self.group_score not in GROUP_SCORES:
            fail("group_score", self.group_score, f"choose one of {GROUP_SCORES}")
        for name in ("router_bias", "input_weighted"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be true or false")
        if not isinstance(self.routed_scaling_factor, (int, float)) or not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", self.routed_scaling_factor, "must be a positive number (1.0: no scaling)")
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size == 0:
            fail("shared_expert_gate", self.shared_expert_gate, "needs shared_expert_ffn_hidden_size > 0")
        if self.router_noise not in ROUTER_NOISES:
            fail("router_noise", self.router_noise, f"choose one of {ROUTER_NOISES}")
        if self.router_jitter_eps < 0 or self.router_jitter_eps >= 1:
            fail("router_jitter_eps", self.router_jitter_eps, "must be in [0, 1)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                fail(name, value, "must be a positive number, or None for dropless routing")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            fail("min_capacity", self.min_capacity, "must be an integer >= 0")
        if self.drop_policy not in DROP_POLICIES:
            fail("drop_policy", self.drop_policy, f"choose one of {DROP_POLICIES}")
        for name in ("aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate", "init_std"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0")
        if self.output_init_std is not None and not self.output_init_std >= 0:
            fail("output_init_std", self.output_init_std, "must be >= 0, or None to use init_std")
        if self.activation not in ACTIVATIONS:
            fail("activation", self.activation, f"choose one of {ACTIVATIONS}")
        for name in ("swiglu_limit", "swiglu_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                fail(name, value, "must be a positive finite number (GPT-OSS: swiglu_limit=7.0, swiglu_alpha=1.702)")
        if self.expert_gemm not in EXPERT_GEMMS:
            fail("expert_gemm", self.expert_gemm, f"choose one of {EXPERT_GEMMS}")
        if self.shared_expert_ffn_hidden_size < 0:
            fail("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size, "must be >= 0 (0 disables)")

    def capacity_factor_for(self, training: bool) -> float | None:
        return self.capacity_factor if training else self.eval_capacity_factor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
