"""Test doubles of the expert modules DeepSpeed and Megatron-DeepSpeed users pass to ``MoE(expert=...)``.

``ParallelMLP`` here has the structure and return convention of Megatron-DeepSpeed's
``megatron.model.transformer.ParallelMLP`` at tensor-parallel size 1 (written from its documented
behaviour, without Megatron): ``dense_h_to_4h`` (a ColumnParallelLinear with ``skip_bias_add=True``)
-> bias add + activation (or the fused tanh-gelu ``bias_gelu_impl``) -> ``dense_4h_to_h`` (a
RowParallelLinear); every linear returns ``(output, bias_or_None)`` and so does the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PARALLEL_MLP_ACTIVATIONS = ("gelu", "openai_gelu", "swiglu", "squared_relu", "bias_gelu_fusion")


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, skip_bias_add: bool) -> None:
        super().__init__()
        self.input_size, self.output_size = in_features, out_features
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = False
        self.gradient_accumulation_fusion = False
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.linear(x, self.weight)
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None


class ColumnParallelLinear(_ParallelLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, skip_bias_add: bool = False) -> None:
        super().__init__(in_features, out_features, bias, skip_bias_add)
        self.output_size_per_partition = out_features  # tensor-parallel size 1
        self.gather_output = False


class RowParallelLinear(_ParallelLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, skip_bias_add: bool = False) -> None:
        super().__init__(in_features, out_features, bias, skip_bias_add)
        self.input_size_per_partition = in_features
        self.input_is_parallel = True


class _BiasGeLU(torch.autograd.Function):
    """Megatron's fused bias + tanh-approximate gelu, with its hand-written derivative."""

    @staticmethod
    def forward(ctx, y, bias):  # type: ignore[override]
        ctx.save_for_backward(y, bias)
        x = y + bias
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, bias = ctx.saved_tensors
        x = y + bias
        tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
        g = ff * grad
        return g, g.reshape(-1, g.shape[-1]).sum(0)


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def erf_gelu(x: torch.Tensor) -> torch.Tensor:  # Megatron's onnx-safe gelu: 1.41421, not sqrt(2)
    return x * 0.5 * (torch.erf(x / 1.41421) + torch.ones_like(x))


class ParallelMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "gelu",
        add_bias: bool = True,
        output_skip_bias_add: bool = True,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        gated = activation == "swiglu"
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden_size, 2 * ffn_hidden_size if gated else ffn_hidden_size, bias=add_bias, skip_bias_add=True
        )
        if tensor_parallel_size > 1:  # a partition of a sliced expert
            self.dense_h_to_4h.output_size *= tensor_parallel_size
        self.bias_gelu_fusion = activation == "bias_gelu_fusion"
        self.swiglu = gated

        def swiglu(x: torch.Tensor) -> torch.Tensor:
            x = torch.chunk(x, 2, dim=-1)
            return F.silu(x[0]) * x[1]

        def squared_relu(x: torch.Tensor) -> torch.Tensor:
            return torch.pow(F.relu(x), 2)

        self.activation_func = {
            "gelu": F.gelu,
            "bias_gelu_fusion": F.gelu,
            "openai_gelu": openai_gelu,
            "erf_gelu": erf_gelu,
            "swiglu": swiglu,
            "squared_relu": squared_relu,
            "tanh": torch.tanh,
        }[activation]
        self.dense_4h_to_h = RowParallelLinear(
            ffn_hidden_size, hidden_size, bias=add_bias, skip_bias_add=output_skip_bias_add
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        intermediate, bias = self.dense_h_to_4h(hidden_states)
        if self.bias_gelu_fusion:
            intermediate = _BiasGeLU.apply(intermediate, bias)
        else:
            if bias is not None:
                intermediate = intermediate + bias
            intermediate = self.activation_func(intermediate)
        return self.dense_4h_to_h(intermediate)


class FunctionalExpert(nn.Module):
    """Linear -> ``act`` (a function) -> Linear, written as a custom module."""

    def __init__(self, hidden: int, ffn: int, act, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(hidden, ffn, bias=bias), nn.Linear(ffn, hidden, bias=bias), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MethodReluExpert(FunctionalExpert):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).relu())


class SquaredReluExpert(FunctionalExpert):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) ** 2)


class ScaledExpert(FunctionalExpert):
    """Linear -> gelu -> Linear, then scaled: one step more than a recognised form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.fc2(F.gelu(self.fc1(x)))


class BranchingExpert(FunctionalExpert):
    """Data-dependent control flow: cannot be traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.relu(h) if h.sum() > 0 else F.gelu(h))


class GatedExpert(nn.Module):
    """A SwiGLU written by hand with three Linears (not a recognised form: runs as module copies)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TupleExpert(nn.Module):
    """Returns (output, something else): DeepSpeed uses the first element only."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(torch.tanh(self.fc(x))), x.sum()


class LinearSubclass(nn.Linear):
    """A Linear subclass (e.g. a LoRA-style wrapper) may compute anything: never a recognised form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def expert_zoo(hidden: int, ffn: int) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (expert, recognised activation or None for the module-copy fallback)."""
    zoo: dict[str, tuple[nn.Module, str | None]] = {
        "seq_gelu": (nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)), "gelu"),
        "seq_relu_nobias": (
            nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.ReLU(), nn.Linear(ffn, hidden, bias=False)),
            "relu",
        ),
        "seq_silu_dropout0_identity": (
            nn.Sequential(nn.Linear(hidden, ffn), nn.SiLU(), nn.Dropout(0.0), nn.Identity(), nn.Linear(ffn, hidden)),
            "silu",
        ),
        "seq_gelu_tanh": (
            nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, hidden)),
            "gelu_tanh",
        ),
        "seq_mixed_bias": (
            nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden, bias=False)),
            "gelu",
        ),
        "two_linears": (nn.Sequential(nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)), "identity"),
        "one_linear": (nn.Linear(hidden, hidden), "identity"),
        "one_linear_nobias": (nn.Linear(hidden, hidden, bias=False), "identity"),
        "fn_relu": (FunctionalExpert(hidden, ffn, F.relu), "relu"),
        "fn_torch_relu": (FunctionalExpert(hidden, ffn, torch.relu), "relu"),
        "fn_silu": (FunctionalExpert(hidden, ffn, F.silu), "silu"),
        "method_relu": (MethodReluExpert(hidden, ffn, None), "relu"),
        "squared_relu": (SquaredReluExpert(hidden, ffn, None), "squared_relu"),
        # fallback
        "seq_tanh": (nn.Sequential(nn.Linear(hidden, ffn), nn.Tanh(), nn.Linear(ffn, hidden)), None),
        "seq_dropout": (
            nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Dropout(0.1), nn.Linear(ffn, hidden)),
            None,
        ),
        "seq_layernorm": (nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden)), None),
        "scaled": (ScaledExpert(hidden, ffn, None), None),
        "branching": (BranchingExpert(hidden, ffn, None), None),
        "gated_3_linears": (GatedExpert(hidden, ffn), None),
        "tuple_output": (TupleExpert(hidden), None),
        "linear_subclass": (LinearSubclass(hidden, hidden), None),
        "tied": (nn.Sequential(*(lambda lin: [lin, nn.ReLU(), lin])(nn.Linear(hidden, hidden))), None),
        "pmlp_erf_gelu": (ParallelMLP(hidden, ffn, "erf_gelu"), None),
        "pmlp_tanh": (ParallelMLP(hidden, ffn, "tanh"), None),
        "pmlp_tp2": (ParallelMLP(hidden, ffn, "gelu", tensor_parallel_size=2), None),
    }
    expected = {"gelu": "gelu", "openai_gelu": "gelu_tanh", "swiglu": "swiglu", "squared_relu": "squared_relu"}
    expected["bias_gelu_fusion"] = "gelu_tanh"
    for act in PARALLEL_MLP_ACTIVATIONS:
        for add_bias in (True, False):
            if act == "bias_gelu_fusion" and not add_bias:
                continue  # Megatron asserts add_bias with the fusion
            for skip in (True, False):
                name = f"pmlp_{act}_{'bias' if add_bias else 'nobias'}_{'skip' if skip else 'add'}"
                zoo[name] = (ParallelMLP(hidden, ffn, act, add_bias, skip), expected[act])
    return zoo
