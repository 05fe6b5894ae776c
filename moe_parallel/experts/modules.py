"""Experts built from a user's ``nn.Module`` (the DeepSpeed drop-in's ``expert=`` argument).

Two forms, both with the experts interface (``interface.py``), so
:class:`~moe_parallel.core.layer.MoELayer` runs either:

- :class:`StackedExperts`: the expert's Linear weights stacked over the local experts. Built when
  :func:`recognise_expert` finds one of the forms it knows (one Linear; two Linears with or without an
  activation between them; Megatron-DeepSpeed's ``ParallelMLP`` at tensor-parallel size 1). Forms the
  grouped kernels of ``GroupedExperts`` compute (gelu/relu/silu/swiglu between two Linears) run there;
  the others run a per-expert loop of plain autograd ops on the stacked weights.
- :class:`ModuleExperts`: one deep copy of the module per local expert, as DeepSpeed keeps them, each
  run on its own routed rows. Any module whose output (or the first element of a tuple output, as
  DeepSpeed takes it) has the input's shape works.

Both start every local expert as a copy of the given module, as DeepSpeed's deep copies do.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import DEFAULT_CLAMP
from .interface import host_counts
from .loop import row_blocks
from .stacked import GroupedExperts

# Activations a recognised form may have; the first four are the grouped kernels' own.
NATIVE_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda h: h,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "squared_relu": lambda h: F.relu(h).square(),
    "silu": F.silu,
    "swiglu": _swiglu,
}


@dataclass(frozen=True)
class ExpertForm:
    """A recognised expert: ``[out_bias_ignored] Linear2(act(Linear1(x)))`` or ``Linear1(x)``.

    Names are the expert module's own parameter names (``"0.weight"``, ``"dense_h_to_4h.bias"``):
    the per-expert keys of DeepSpeed's state dict. ``ignored_bias`` is an output bias the module
    returns beside its output (``ParallelMLP`` with ``skip_bias_add=True``): DeepSpeed's layer takes
    only the first element of a tuple, so that bias exists but never reaches the output.
    """

    kind: str  # how it was found: "sequential", "parallel_mlp"
    activation: str  # a key of ACTIVATION_FUNCTIONS
    w1: str
    b1: str | None
    w2: str | None  # None: a single Linear
    b2: str | None
    ignored_bias: str | None = None

    @property
    def native(self) -> bool:
        return self.w2 is not None and self.activation in NATIVE_ACTIVATIONS

    def names(self) -> dict[str, str]:
        """Stacked parameter -> the module's parameter name."""
        pairs = {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "ignored_bias": self.ignored_bias}
        return {k: v for k, v in pairs.items() if v is not None}


# -- recognition ------------------------------------------------------------------------------------


def _module_activation(module: nn.Module) -> str | None:
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(module))


def _is_no_op_module(module: nn.Module) -> bool:
    return type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0.0)


_FUNCTION_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}
_METHOD_ACTIVATIONS = {"relu": "relu"}


def _step_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, object] | None:
    """What one traced node does to its single tensor input: ("linear", name), ("act", name),
    ("square", None), ("skip", None); None if it is none of these."""
    args, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_module":
        module = modules[str(node.target)]
        if args or kwargs:
            return None
        if type(module) is nn.Linear:
            return ("linear", str(node.target))
        if _is_no_op_module(module):
            return ("skip", None)
        act = _module_activation(module)
        return ("act", act) if act else None
    if node.op == "call_function":
        target = node.target
        if target in _FUNCTION_ACTIVATIONS:
            kwargs.pop("inplace", None)
            if target is F.gelu:
                approximate = kwargs.pop("approximate", args[0] if args else "none")
                args = args[1:]
                name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
            else:
                args = args[1:] if args and isinstance(args[0], bool) else args  # positional inplace
                name = _FUNCTION_ACTIVATIONS[target]
            return ("act", name) if name and not args and not kwargs else None
        if target in (operator.pow, torch.pow) and args == (2,) and not kwargs:
            return ("square", None)
        if target is torch.square and not args and not kwargs:
            return ("square", None)
        if target is F.dropout and not node.args[1:] and kwargs.get("p") == 0.0:
            return ("skip", None)
        return None
    if node.op == "call_method":
        if node.target in _METHOD_ACTIVATIONS and not args and not kwargs:
            return ("act", _METHOD_ACTIVATIONS[node.target])
        if (node.target == "square" and not args and not kwargs) or (node.target == "pow" and args == (2,)):
            return ("square", None)
    return None


def _sequential_form(expert: nn.Module) -> ExpertForm | None:
    """Linear [-> act] [-> Linear] as traced by torch.fx, each step feeding only the next."""
    if type(expert) is nn.Linear:  # fx would trace into its forward rather than see one Linear
        return ExpertForm("sequential", "identity", "weight", "bias" if expert.bias is not None else None, None, None)
    try:
        traced = torch.fx.symbolic_trace(expert)
    except Exception:  # untraceable forward (data-dependent control flow, ...): not a known form
        return None
    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    if sum(node.op == "placeholder" for node in nodes) != 1:
        return None
    steps: list[tuple[str, object]] = []
    previous = nodes[0]
    for node in nodes[1:-1]:
        if node.op == "get_attr" or not node.args or node.args[0] is not previous or len(node.users) != 1:
            return None
        step = _step_of(node, modules)
        if step is None:
            return None
        if step[0] != "skip":
            steps.append(step)
        previous = node
    if nodes[-1].args != (previous,):
        return None
    # relu followed by a square is one activation
    collapsed: list[tuple[str, object]] = []
    for step in steps:
        if step[0] == "square":
            if not collapsed or collapsed[-1] != ("act", "relu"):
                return None
            collapsed[-1] = ("act", "squared_relu")
        else:
            collapsed.append(step)
    kinds = [kind for kind, _ in collapsed]
    if kinds == ["linear"]:
        fc1, act, fc2 = collapsed[0][1], "identity", None
    elif kinds == ["linear", "linear"]:
        fc1, act, fc2 = collapsed[0][1], "identity", collapsed[1][1]
    elif kinds == ["linear", "act", "linear"]:
        fc1, act, fc2 = collapsed[0][1], collapsed[1][1], collapsed[2][1]
    else:
        return None
    if fc1 == fc2:
        return None  # tied weights
    linear1 = modules[fc1]
    linear2 = modules[fc2] if fc2 else None
    return ExpertForm(
        kind="sequential",
        activation=str(act),
        w1=f"{fc1}.weight",
        b1=f"{fc1}.bias" if linear1.bias is not None else None,
        w2=f"{fc2}.weight" if fc2 else None,
        b2=f"{fc2}.bias" if linear2 is not None and linear2.bias is not None else None,
    )


def _probe_activation(func: Callable[[Tensor], Tensor]) -> str | None:
    """Which known activation ``func`` computes, found by evaluating it (float64, [-6, 6])."""
    probe = torch.linspace(-6.0, 6.0, 96, dtype=torch.float64).reshape(4, 24)
    try:
        with torch.no_grad():
            out = func(probe.clone())
    except Exception:
        return None
    if not isinstance(out, Tensor) or out.dtype != torch.float64:
        return None
    for name in ("gelu", "gelu_tanh", "relu", "squared_relu", "silu", "swiglu"):
        expected = ACTIVATION_FUNCTIONS[name](probe)
        # 1e-7 relative: Megatron writes sqrt(2/pi) as 0.79788456
        if out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-7, atol=1e-9):
            return name
    return None


def _parallel_mlp_form(expert: nn.Module) -> ExpertForm | None:
    """Megatron(-DeepSpeed)'s ParallelMLP: ColumnParallelLinear -> act -> RowParallelLinear, both
    returning ``(output, bias_or_None)``, at tensor-parallel size 1 (experts are never sliced there
    unless ``enable_expert_tensor_parallelism``)."""
    fc1 = getattr(expert, "dense_h_to_4h", None)
    fc2 = getattr(expert, "dense_4h_to_h", None)
    if not isinstance(fc1, nn.Module) or not isinstance(fc2, nn.Module) or not hasattr(expert, "activation_func"):
        return None
    if {name for name, _ in expert.named_children()} != {"dense_h_to_4h", "dense_4h_to_h"}:
        return None
    for linear in (fc1, fc2):
        own = {name for name, _ in linear.named_parameters()}
        if not isinstance(getattr(linear, "weight", None), Tensor) or own - {"weight", "bias"}:
            return None
        if list(linear.children()) or not isinstance(getattr(linear, "skip_bias_add", None), bool):
            return None
        if getattr(linear, "sequence_parallel", False) or getattr(linear, "gradient_accumulation_fusion", False):
            return None
    # Tensor-parallel size 1: the partitions are the whole matrices.
    if getattr(fc1, "output_size_per_partition", None) != getattr(fc1, "output_size", None):
        return None
    if getattr(fc2, "input_size_per_partition", None) != getattr(fc2, "input_size", None):
        return None
    if getattr(expert, "ds_sequence_parallel_fpdt", False):
        return None
    if getattr(expert, "bias_gelu_fusion", False):
        if fc1.bias is None:
            return None
        activation = "gelu_tanh"  # Megatron's bias_gelu: the tanh approximation
    else:
        activation = _probe_activation(expert.activation_func)
        if activation is None:
            return None
    b1 = "dense_h_to_4h.bias" if getattr(fc1, "bias", None) is not None else None
    has_b2 = getattr(fc2, "bias", None) is not None
    return ExpertForm(
        kind="parallel_mlp",
        activation=activation,
        w1="dense_h_to_4h.weight",
        b1=b1,
        w2="dense_4h_to_h.weight",
        b2="dense_4h_to_h.bias" if has_b2 and not fc2.skip_bias_add else None,
        ignored_bias="dense_4h_to_h.bias" if has_b2 and fc2.skip_bias_add else None,
    )


def _form_tensors(expert: nn.Module, form: ExpertForm) -> dict[str, Tensor]:
    params = dict(expert.named_parameters())
    return {key: params[name] for key, name in form.names().items()}


def _check_shapes(form: ExpertForm, tensors: dict[str, Tensor], hidden_size: int) -> bool:
    w1 = tensors["w1"]
    if w1.dim() != 2 or w1.shape[1] != hidden_size:
        return False
    up = w1.shape[0]
    if form.w2 is None:
        out, mid = up, None
    else:
        w2 = tensors["w2"]
        mid = up // 2 if form.activation == "swiglu" else up
        if w2.dim() != 2 or w2.shape[1] != mid or (form.activation == "swiglu" and up % 2):
            return False
        out = w2.shape[0]
    if out != hidden_size:
        return False
    expected = {"b1": (up,), "b2": (hidden_size,), "ignored_bias": (hidden_size,)}
    if any(tuple(tensors[k].shape) != shape for k, shape in expected.items() if k in tensors):
        return False
    reference = tensors["w1"]
    return all(t.dtype == reference.dtype and t.device == reference.device for t in tensors.values())


def _form_output(form: ExpertForm, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    h = F.linear(x, tensors["w1"], tensors.get("b1"))
    a = ACTIVATION_FUNCTIONS[form.activation](h)
    return a if form.w2 is None else F.linear(a, tensors["w2"], tensors.get("b2"))


def _matches_module(expert: nn.Module, form: ExpertForm, tensors: dict[str, Tensor], hidden_size: int) -> bool:
    """Run the module and the form on a probe batch: a form is only used where it computes what the
    module computes (a forward with extra steps fx could not see, an overridden method, ...)."""
    reference = tensors["w1"]
    if reference.device.type == "meta":
        return True  # nothing to run; the structure alone decides
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a seeded model's init must not move
    x = torch.randn(1, 7, hidden_size, generator=gen).to(device=reference.device, dtype=reference.dtype)
    try:
        with torch.no_grad():
            out = expert(x)
            if isinstance(out, tuple):
                out = out[0]
            expected = _form_output(form, tensors, x)
    except Exception:
        return False
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        return False
    tol = 1e-5 if reference.dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol * (1 + expected.abs().max().item()))


def recognise_expert(expert: nn.Module, hidden_size: int) -> ExpertForm | None:
    """The stacked form of ``expert``, or None when it must run as module copies (:class:`ModuleExperts`).

    A form is returned only if the module holds no parameters or buffers beyond its Linears and, run
    on a probe batch, computes the same output as the form (the first element of a tuple output,
    as DeepSpeed's layer uses it).
    """
    if not isinstance(expert, nn.Module):
        return None
    form = _parallel_mlp_form(expert) or _sequential_form(expert)
    if form is None:
        return None
    if list(expert.buffers()):
        return None
    tensors = _form_tensors(expert, form)
    if {id(p) for p in expert.parameters()} != {id(t) for t in tensors.values()}:
        return None  # parameters beyond the Linears (or shared ones)
    if not _check_shapes(form, tensors, hidden_size):
        return None
    return form if _matches_module(expert, form, tensors, hidden_size) else None


# -- experts ----------------------------------------------------------------------------------------


def _concat(x: Tensor, outputs: list[Tensor], counts: list[int]) -> Tensor:
    """The experts' outputs in row order, zero rows for the padding past ``sum(counts)``."""
    padding = x.shape[0] - sum(counts)
    if padding:
        outputs = [*outputs, x.new_zeros(padding, x.shape[-1])]
    return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])


class StackedExperts(GroupedExperts):
    """The local experts of a recognised form, each Linear's weights stacked as ``[e, in, out]``.

    Native forms (two Linears around gelu/relu/silu/swiglu) run :class:`GroupedExperts`' grouped
    kernels; the others (one Linear, no activation, tanh-gelu, squared ReLU) a per-expert loop of
    autograd ops. An ``ignored_bias`` (see :class:`ExpertForm`) is a parameter that never enters the
    output, as in DeepSpeed's layer; it exists for the state dict and the optimizer's layout.
    """

    def __init__(self, expert: nn.Module, form: ExpertForm, num_local_experts: int, first_expert_id: int = 0) -> None:
        nn.Module.__init__(self)  # GroupedExperts' seeded init is replaced by copies of `expert`
        self.form = form
        self.num_local_experts = num_local_experts
        self.first_expert_id = first_expert_id
        self.activation = form.activation
        self.clamp = DEFAULT_CLAMP  # no recognised form is clamped_swiglu
        self.expert_gemm = "auto"
        self.resolved_gemm = None if form.native else "modules"  # non-native forms: a loop of autograd ops
        self.owns_output_grad = False
        tensors = _form_tensors(expert, form)

        def stacked(key: str) -> nn.Parameter | None:
            t = tensors.get(key)
            if t is None:
                return None
            t = t.detach().t() if key in ("w1", "w2") else t.detach()
            stack = t.unsqueeze(0).repeat(num_local_experts, *([1] * t.dim())).contiguous()
            return nn.Parameter(stack, requires_grad=tensors[key].requires_grad)  # frozen stays frozen

        self.w1, self.b1, self.w2, self.b2 = (stacked(k) for k in ("w1", "b1", "w2", "b2"))
        self.ignored_bias = stacked("ignored_bias")

    def reset_parameters(self) -> None:
        raise NotImplementedError("StackedExperts start as copies of the user's expert; there is no seeded init")

    def execution_path(self, x: Tensor) -> str:
        return super().execution_path(x) if self.form.native else "modules"

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if not self.form.native:
            self.resolved_gemm = "modules"
        return result

    def forward(self, x: Tensor, tokens_per_expert: Tensor | list[int], counts_host: list[int] | None = None) -> Tensor:
        if self.form.native:
            return super().forward(x, tokens_per_expert, counts_host)
        counts = host_counts(self, x, tokens_per_expert, counts_host)
        act = ACTIVATION_FUNCTIONS[self.activation]
        params = [None if p is None else p.to(x.dtype) for p in (self.w1, self.b1, self.w2, self.b2)]
        w1, b1, w2, b2 = (None if p is None else p.unbind(0) for p in params)
        outputs = []
        for j, rows in enumerate(row_blocks(counts)):
            x_e = x[rows]
            h = x_e @ w1[j] if b1 is None else torch.addmm(b1[j], x_e, w1[j])
            out = act(h)
            if w2 is not None:
                out = out @ w2[j] if b2 is None else torch.addmm(b2[j], out, w2[j])
            outputs.append(out)
        return _concat(x, outputs, counts)

    def deepspeed_names(self) -> dict[str, str]:
        """Stacked parameter -> its name inside one DeepSpeed expert copy."""
        return self.form.names()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_local_experts} (first global id {self.first_expert_id}), form={self.form.kind}, "
            f"act={self.activation}, {'grouped kernels' if self.form.native else 'per-expert loop'}"
        )


class ModuleExperts(nn.Module):
    """One copy of the user's module per local expert (DeepSpeed's ``Experts``), each run on its rows.

    ``deepspeed_experts[j]`` is local expert j, a ``copy.deepcopy`` of the given module. Each copy is
    called on a ``[1, rows, hidden]`` tensor (DeepSpeed passes ``[ep, capacity, hidden]``), also when
    it has no rows, so every expert parameter gets a gradient (zero when unused) as with DeepSpeed. A
    tuple output counts by its first element, as in DeepSpeed.
    """

    def __init__(self, expert: nn.Module, num_local_experts: int, first_expert_id: int = 0) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        self.first_expert_id = first_expert_id

    def needs_host_counts(self, x: Tensor) -> bool:
        return True

    def forward(self, x: Tensor, tokens_per_expert: Tensor | list[int], counts_host: list[int] | None = None) -> Tensor:
        """Same contract as :meth:`GroupedExperts.forward`."""
        counts = host_counts(self, x, tokens_per_expert, counts_host)
        outputs = []
        for j, (rows, expert) in enumerate(zip(row_blocks(counts), self.deepspeed_experts)):
            x_e = x[rows]
            out = expert(x_e.unsqueeze(0))
            if isinstance(out, tuple):
                out = out[0]  # DeepSpeed ignores the rest (ParallelMLP's output bias)
            if not isinstance(out, Tensor) or out.shape != (1, *x_e.shape):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"expert {self.first_expert_id + j} returned {got} for an input of shape {(1, *x_e.shape)}: "
                    "an MoE expert must map [..., hidden_size] to the same shape"
                )
            outputs.append(out.squeeze(0).to(x.dtype))
        return _concat(x, outputs, counts)

    def extra_repr(self) -> str:
        return f"experts={self.num_local_experts} (first global id {self.first_expert_id}), module copies"


def build_module_experts(
    expert: nn.Module, hidden_size: int, num_local_experts: int, first_expert_id: int = 0
) -> StackedExperts | ModuleExperts:
    """:class:`StackedExperts` when ``expert`` has a recognised form, else :class:`ModuleExperts`."""
    form = recognise_expert(expert, hidden_size)
    if form is None:
        return ModuleExperts(expert, num_local_experts, first_expert_id)
    return StackedExperts(expert, form, num_local_experts, first_expert_id)
