"""Activation memory of one micro-batch on one pipeline stage: the bytes saved for backward.

One tool measures and predicts. :func:`saved_tensor_bytes` counts, through
``torch.autograd.graph.saved_tensors_hooks``, the bytes of every distinct storage that autograd
saves for backward, parameters and buffers excluded: around a real step on the CPU it measures,
around a forward of the stage built on the meta device (``planning/model.py``) it predicts, for a
600B-class model as cheaply as for a toy one (meta tensors have shapes and no memory).

What the prediction assumes, and why:

- **Experts: the grouped GEMM** (``expert_gemm="grouped"``, what ``auto`` resolves to on a CUDA GPU
  in bf16). It keeps the row counts on the device, so the MoE layer at EP = 1 traces on meta with
  static shapes: all ``A = T * K`` assignment rows are gathered and computed, the dropped ones
  (capacity factor) as padding, exactly as the real layer does at EP = 1, dropless or not.
- **EP > 1: the balanced expectation.** There a rank sends only its kept rows and receives what its
  peers route to its experts; both counts are host values a meta tensor cannot give. The trace
  replaces the two all-to-alls by a shape-only exchange and uses the rows a balanced step moves:
  each of E experts gets ``T * K / E`` assignments from each rank and keeps at most C, so a rank
  sends and receives ``min(T * K, E * C)`` rows (``T * K`` dropless), the same number that EP = 1
  computes when nothing is dropped. The rest is what the real EP > 1 path saves and EP = 1 does not
  (or the reverse): the two regroup permutations (``int64`` per received row, with more than one
  local expert), no padding mask. The dispatcher's own code (gather, regroup, combine) runs.
  Routing imbalance moves the received rows away from the expectation (the worst case is
  ``E * C`` rows with a capacity and ``EP * T * K`` dropless).
- **Attention backend** (``attention``): ``"math"``, the SDPA math path (what this CPU measures
  with ``sdpa_kernel(SDPBackend.MATH)``: it saves the ``[B, H, S, S]`` probabilities);
  ``"flash"``, what a GPU runs (:data:`GPU_ATTENTION`, the default): flash attention saving q, k, v,
  the output and the fp32 logsumexp, or, where flash does not take the shapes (different q/k and
  v head dims as in MLA, or a mask), the memory-efficient kernel, which saves the same plus the
  mask as an additive bias; ``"cpu_flash"``: the CPU's flash kernel (this CPU's default SDPA).
  Attention with sinks (GPT-OSS) is explicit code and traces as it runs.
- **Activation checkpointing as the app does it**: ``deepspeed.activation_checkpointing`` reaches
  the model only at PP > 1 (``gpt_pipeline`` / ``decoder_pipeline`` with
  ``activation_checkpoint_interval=1``): DeepSpeed's reentrant ``checkpoint`` runs each transformer
  block (the family's block class, ``checkpointable_layers``) under ``no_grad`` and keeps its input
  tensor on the autograd context (not through ``save_for_backward``, so the hooks do not see it:
  the trace adds it explicitly, and so must a measurement). The embedding, final norm, head and
  loss save as without. At PP = 1 the app builds the plain model, which has no checkpointing:
  ``saved_checkpointed`` equals ``saved`` there and ``checkpointing`` is False.

Shape suffixes: B micro-batch, S sequence, D hidden, V vocabulary, T = B * S tokens, K top-k,
E experts, e = E / EP local experts, A = T * K assignment rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..core.capacity import capacity_from_ratio, capacity_ratio
from ..core.dispatcher import AllToAllTokenDispatcher, CombineState, Dispatch, permute_rows
from ..core.layer import MoELayer, moe_layers
from ..experts import GroupedExperts
from ..models.decoder import DecoderConfig
from ..models.gpt import LMHead, TokenEmbedding
from .model import ModelConfig, build_stage, pipeline_family

ATTENTION_BACKENDS = ("math", "flash", "cpu_flash")
GPU_ATTENTION = "flash"  # what torch's SDPA runs on a CUDA GPU in bf16: flash, else memory-efficient
EXPERT_PATH = "grouped"  # what expert_gemm="auto" resolves to on a CUDA GPU in bf16


# ---------------------------------------------------------------------------------------- counting


def _storage_key(t: Tensor) -> int:
    # The storage's own identity: views of one storage share it, and it exists for meta tensors
    # (whose data pointers are all null).
    return t.untyped_storage()._cdata


class SavedTensorBytes:
    """Distinct storages saved for backward while active, parameters and buffers excluded.

    ``add`` counts a tensor held for backward outside ``save_for_backward`` (DeepSpeed's reentrant
    checkpoint keeps its inputs on the autograd context). A storage counts once, whole: a saved
    view keeps all of its base alive. The counter holds the storages it counted, so no address is
    reused while it lives.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[int, torch.UntypedStorage] = {}

    def add(self, t: Tensor) -> None:
        """Count ``t``'s storage (once; not if excluded); anything but a tensor is ignored."""
        if not isinstance(t, Tensor):
            return
        key = _storage_key(t)
        if key not in self._excluded and key not in self._storages:
            self._storages[key] = t.untyped_storage()

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages counted so far."""
        return sum(s.nbytes() for s in self._storages.values())

    @property
    def count(self) -> int:
        """Distinct storages counted so far."""
        return len(self._storages)

    def _pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t


def module_tensors(*modules: nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``modules`` (what :func:`saved_tensor_bytes` leaves out)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


@contextmanager
def saved_tensor_bytes(*modules: nn.Module, exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensorBytes]:
    """Count the bytes saved for backward inside the block (``counter.bytes`` after it).

    Storages of the parameters and buffers of ``modules`` (and of ``exclude``) are not counted;
    every other saved tensor counts once per storage, meta tensors included. Hooks installed inside
    the block take precedence (torch's non-reentrant checkpoint installs its own): what they save is
    not seen here.
    """
    counter = SavedTensorBytes([*module_tensors(*modules), *exclude])
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter


# ---------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro-batch on one rank of one pipeline stage, in bytes (the ranks of
    a stage differ only by routing at EP > 1, where this is the balanced expectation).

    - ``saved``: saved for backward without activation checkpointing (the loss's on the last stage);
    - ``saved_checkpointed``: with ``deepspeed.activation_checkpointing`` as the app applies it
      (equal to ``saved`` where ``checkpointing`` is False: PP = 1);
    - ``logits``: on the last stage, the distinct vocabulary-sized tensors of the head and the loss,
      held at once before the backward: the logits (in ``dtype``), their fp32 copy for the loss
      (bf16) and the fp32 log-probabilities the loss saves (which ``saved`` includes), multi-token
      prediction heads too; 0 on other stages; ``logits_saved``: the part of them that ``saved``
      holds too (a plan adds ``saved - logits_saved`` and ``logits``, counting each tensor once);
    - ``received``: the activation a stage receives from the previous one (0 on the first), which
      the pipeline engine buffers per micro-batch in flight and clones for the forward;
    - ``sent``: the activation it sends to the next (0 on the last), buffered likewise;
    - ``moe_rows``: the expert rows a rank computes per MoE layer (``T * K`` at EP = 1, the balanced
      expectation ``min(T * K, E * C)`` at EP > 1); 0 without MoE layers;
    - ``recompute``: with checkpointing, what the backward of the largest block holds while it is
      recomputed (that block's saved tensors without checkpointing); 0 where ``checkpointing`` is False;
    - ``forward_flops``: the forward's floating-point operations on this rank (torch's flop counter
      over the traced operators, plus the grouped expert GEMMs it cannot see: 2 per multiply-add of
      ``moe_rows`` rows through each local expert's weights), for step-time estimates;
    - ``attention`` / ``expert_path``: the backends the prediction assumes.
    """

    saved: int
    saved_checkpointed: int
    logits: int
    logits_saved: int
    received: int
    sent: int
    moe_rows: int
    recompute: int
    forward_flops: float
    checkpointing: bool
    attention: str
    expert_path: str
    dtype: torch.dtype
    micro_batch: int
    seq_len: int
    stage: int
    num_stages: int
    ep: int


# ---------------------------------------------------------------------------------------- attention


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # SDPA turns a boolean mask into an additive bias before its fused kernels.
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _fused_attention(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``scaled_dot_product_attention`` through the kernel ``backend`` names, whatever the device."""
    aten = torch.ops.aten
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if backend == "cpu_flash":
        mask = _additive_mask(attn_mask, q.dtype)
        return aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale
        )[0]
    if attn_mask is None and q.shape[-1] == k.shape[-1] == v.shape[-1]:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    bias = _additive_mask(attn_mask, q.dtype)
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]


class _AttentionBackend(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to one backend's kernel (meta tensors take the math
    path whatever ``sdpa_kernel`` says, so the fused kernels are called by name)."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.backend != "math":
            return _fused_attention(self.backend, *args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------- EP > 1 on meta


class _ExchangeRows(torch.autograd.Function):
    """The all-to-all's shape: ``rows`` new rows out, nothing saved (as ``comm._AllToAll``)."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        ctx.rows_in = x.shape[0]
        return x.new_empty((rows, *x.shape[1:]))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.new_empty((ctx.rows_in, *grad.shape[1:])), None


def expected_rows(layer: MoELayer, num_tokens: int, ep: int) -> int:
    """Rows one rank's experts compute in a balanced training step: ``T * K`` at EP = 1 (the grouped
    GEMM computes dropped rows as padding), ``min(T * K, E * C)`` sent and received at EP > 1."""
    cfg = layer.config
    rows = num_tokens * cfg.top_k
    ratio = capacity_ratio(cfg.capacity_factor_for(True))
    capacity = capacity_from_ratio(num_tokens, cfg.top_k, cfg.num_experts, ratio, cfg.min_capacity)
    if ep == 1 or capacity is None:
        return rows
    return min(rows, cfg.num_experts * capacity)


class _BalancedEPDispatcher(AllToAllTokenDispatcher):
    """One rank's dispatcher in an EP group of ``ep`` ranks, on meta: the dispatcher's own gather,
    regroup and combine, with the collectives replaced by shape-only exchanges of the balanced
    expectation of rows (:func:`expected_rows`)."""

    def __init__(self, layer: MoELayer, ep: int) -> None:
        super().__init__(layer.num_experts, None, layer.config.input_weighted)
        self.ep_size = ep
        self.num_local_experts = layer.num_experts // ep
        self.layer = layer

    def dispatch(self, x_TD: Tensor, plan, **_: object) -> Dispatch:  # type: ignore[override]
        rows = expected_rows(self.layer, x_TD.shape[0], self.ep_size)
        state = CombineState(plan.token_idx_A[:rows], plan.weight_A[:rows], x_TD.shape[0])
        x_send = self._gather_rows(x_TD, state)
        recv_counts_Re = torch.empty(
            self.ep_size, self.num_local_experts, dtype=torch.int64, device=x_TD.device
        )  # the counts exchange's result: values a meta tensor does not have
        dispatch = Dispatch(recv_counts_Re.sum(0), None, state, recv_counts_Re=recv_counts_Re)
        dispatch.x_local = self._regroup(_ExchangeRows.apply(x_send, rows), dispatch)
        return dispatch

    def _return_rows(self, out_local: Tensor, state: CombineState) -> Tensor:
        if state.ungroup_idx is not None:
            out_local = permute_rows(out_local, state.ungroup_idx, state.group_idx)
        return _ExchangeRows.apply(out_local, state.token_idx_M.shape[0])


# ---------------------------------------------------------------------------------------- tracing


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that is a no-op for the meta device, which torch's autocast refuses: the
    layers that switch autocast off around float32 code (router, experts) trace unchanged, and a
    trace never runs under autocast."""

    def __init__(self, device_type: str, *args, **kwargs) -> None:
        self._meta = device_type == "meta"
        if not self._meta:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return None if self._meta else super().__enter__()

    def __exit__(self, *exc):
        return None if self._meta else super().__exit__(*exc)


@contextmanager
def _meta_autocast() -> Iterator[None]:
    with mock.patch.object(torch, "autocast", _MetaAutocast):
        yield


class _Recompute(torch.autograd.Function):
    """DeepSpeed's reentrant ``checkpoint`` as the trace sees it: ``fn`` runs under ``no_grad`` and
    nothing is saved (its input is counted by the caller)."""

    @staticmethod
    def forward(ctx, fn, x: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        raise RuntimeError("a traced stage is never back-propagated")


class _VocabTensors(TorchDispatchMode):
    """Records the vocabulary-sized tensors of the head and the loss: the output of an op that reads
    the head's ``[V, D]`` weight (or the tied embedding's) or a tensor recorded before, with a last
    dimension of V. Following where the values come from, not the shapes alone, keeps out an
    activation that is V wide by coincidence."""

    def __init__(self, vocab_size: int, weights: Iterable[Tensor]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self._sources = {_storage_key(w) for w in weights}
        self.counter = SavedTensorBytes(weights)  # a view of the weight (its transpose) is no new tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in (*args, *(kwargs or {}).values()) if isinstance(t, Tensor)]
        if any(_storage_key(t) in self._sources for t in inputs):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab_size and t.is_floating_point():
                    self.counter.add(t)
                    self._sources.add(_storage_key(t))
        return out


def _prepare_for_trace(module: nn.Module, dtype: torch.dtype, ep: int) -> None:
    module.to(dtype)
    module.train()
    for sub in module.modules():
        if isinstance(sub, GroupedExperts):
            sub.resolved_gemm = EXPERT_PATH  # after .to(), which resets a resolved "auto"
    for layer in moe_layers(module):
        # The input check reads a device flag on the host, which meta cannot; it saves nothing.
        layer.config = dataclasses.replace(layer.config, check_inputs=False)
        if ep > 1:
            layer.dispatcher = _BalancedEPDispatcher(layer, ep)


def _is_block(func, block_class: str) -> bool:
    return not isinstance(func, partial) and type(func).__name__ == block_class


def _plain_loss(model: nn.Module, logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """The loss the app computes at PP = 1 (with multi-token prediction, the training total)."""
    training_loss = getattr(model, "training_loss", None)
    if training_loss is not None:
        return training_loss(logits_BSV, targets_BS)[0]
    return model.loss(logits_BSV, targets_BS)


def _stage_loss(stage_model, config: ModelConfig):
    """The last stage's loss function as the pipeline builder attaches it."""
    from ..models.mtp import MTPLoss, MTPStack

    stacks = [f for f in stage_model.forward_funcs if isinstance(f, MTPStack)]
    if not stacks:
        return stage_model.loss_fn
    from ..integration.pipeline import TIED_EMBEDDING_KEY

    embedding = stage_model.module.tied_modules[TIED_EMBEDDING_KEY]
    heads = [f for f in stage_model.forward_funcs if isinstance(f, LMHead)]
    return MTPLoss(stacks[0], embedding, heads[0] if heads else embedding)


def _trace(
    config: ModelConfig,
    num_stages: int,
    stage: int,
    micro_batch: int,
    seq_len: int,
    ep: int,
    dtype: torch.dtype,
    attention: str,
    checkpointed: bool,
) -> tuple[int, int, int, int, int, int, float, int]:
    """One traced forward (and loss) of the stage on meta: ``(saved, logits, received, sent, moe_rows,
    largest block's saved bytes, forward flops, the logits' bytes among the saved)``."""
    stage_model = build_stage(config, num_stages, stage, ep=1)
    module = stage_model.module
    _prepare_for_trace(module, dtype, ep)
    B, S, D = micro_batch, seq_len, config.hidden_size
    meta = torch.device("meta")
    if stage_model.is_first:
        x = torch.zeros(B, S, dtype=torch.int64, device=meta)
        received = 0
    else:
        # The engine's clone of its receive buffer, which requires grad (its gradient goes back).
        x = torch.empty(B, S, D, dtype=dtype, device=meta, requires_grad=True)
        received = x.untyped_storage().nbytes()
    block_class = pipeline_family(config).block
    head_weights = [m.weight for m in module.modules() if isinstance(m, (TokenEmbedding, LMHead))]
    vocab = _VocabTensors(config.vocab_size, head_weights)
    flops = FlopCounterMode(display=False)
    largest_block = 0
    with _meta_autocast(), _AttentionBackend(attention), saved_tensor_bytes(module) as counter, flops:
        funcs = stage_model.forward_funcs
        for idx, func in enumerate(funcs):
            last_func = stage_model.is_last and idx == len(funcs) - 1
            if checkpointed and _is_block(func, block_class):
                counter.add(x)
                x = _Recompute.apply(func, x)
            elif last_func:
                with vocab:
                    x = func(x)
            else:
                before = counter.bytes
                x = func(x)
                if _is_block(func, block_class):
                    largest_block = max(largest_block, counter.bytes - before)
        sent = 0 if stage_model.is_last else x.untyped_storage().nbytes()
        if stage_model.is_last:
            targets = torch.zeros(B, S, dtype=torch.int64, device=meta)
            with vocab:
                if num_stages == 1:
                    _plain_loss(module, x, targets)
                else:
                    _stage_loss(stage_model, config)(x, targets)
    logits = vocab.counter.bytes if stage_model.is_last else 0
    both = set(vocab.counter._storages) & set(counter._storages)
    logits_saved = sum(counter._storages[key].nbytes() for key in both)
    layers = moe_layers(module)
    rows = expected_rows(layers[0], B * S, ep) if layers else 0
    # The grouped GEMM is a custom op the flop counter does not see: each row goes through one
    # expert's weights (its share of the stacked [E, ...] parameters), 2 flops per multiply-add.
    expert_flops = sum(
        2 * rows * sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts for layer in layers
    )
    flops_total = flops.get_total_flops() + expert_flops
    return counter.bytes, logits, received, sent, rows, largest_block, flops_total, logits_saved


def predict_activation_bytes(
    config: ModelConfig,
    *,
    num_stages: int,
    stage: int,
    micro_batch: int,
    seq_len: int,
    ep: int,
    dtype: torch.dtype,
    attention: str = GPU_ATTENTION,
) -> ActivationBytes:
    """Bytes one rank of ``stage`` (of ``num_stages``) saves for backward per micro-batch of
    ``micro_batch`` sequences of ``seq_len`` tokens, at expert-parallel size ``ep``, activations in
    ``dtype``, with and without activation checkpointing (see the module docstring for what is
    assumed: the grouped-GEMM experts, balanced routing at EP > 1, the ``attention`` backend, one of
    :data:`ATTENTION_BACKENDS`; ``"flash"`` is what a GPU runs).

    Traces the stage built by ``build_stage(config, num_stages, stage, ep=1)`` on the meta device:
    no memory is allocated, whatever the model's size.
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_BACKENDS}")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    moe = getattr(config, "moe", None)
    if moe is not None and moe.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={moe.num_experts}")
    args = (config, num_stages, stage, micro_batch, seq_len, ep, dtype, attention)
    saved, logits, received, sent, rows, largest_block, forward_flops, logits_saved = _trace(*args, checkpointed=False)
    checkpointing = num_stages > 1
    saved_checkpointed = _trace(*args, checkpointed=True)[0] if checkpointing else saved
    return ActivationBytes(
        saved=saved,
        saved_checkpointed=saved_checkpointed,
        logits=logits,
        logits_saved=logits_saved,
        received=received,
        sent=sent,
        moe_rows=rows,
        recompute=largest_block if checkpointing else 0,
        forward_flops=float(forward_flops),
        checkpointing=checkpointing,
        attention=attention,
        expert_path=EXPERT_PATH,
        dtype=dtype,
        micro_batch=micro_batch,
        seq_len=seq_len,
        stage=stage,
        num_stages=num_stages,
        ep=ep,
    )


# ---------------------------------------------------------------------------------------- measuring a real step


def measure_plain_step(model: nn.Module, tokens: Tensor, targets: Tensor) -> int:
    """Bytes a real training step of the plain model saves for backward (forward and loss as the app
    runs them at PP = 1), then its backward. The caller picks the attention backend (``sdpa_kernel``)."""
    model.train()
    with saved_tensor_bytes(model) as counter:
        logits = model(tokens)
        loss = _plain_loss(model, logits, targets)
    loss.backward()
    return counter.bytes


def count_pipeline_forwards(engine) -> list[int]:
    """Make ``engine`` (a PipelineEngine) count what each micro-batch's forward (and loss) saves for
    backward: the returned list fills with one entry per forward. DeepSpeed's reentrant checkpoint
    keeps a block's inputs on its autograd context, not through ``save_for_backward``: they are
    counted where the pipeline hands them to its checkpoint function."""
    from ..integration.pipeline import wrap_forward_pass

    per_micro_batch: list[int] = []
    active: list[SavedTensorBytes] = []

    def counted(forward):
        def counted_forward(self, buffer_id):
            with saved_tensor_bytes(self.module) as counter:
                active.append(counter)
                forward(self, buffer_id)
                active.pop()
            per_micro_batch.append(counter.bytes)

        return counted_forward

    wrap_forward_pass(engine, counted)
    checkpoint = engine.module.activation_checkpoint_func

    def counted_checkpoint(function, *args):
        for arg in args:
            active[-1].add(arg)
        return checkpoint(function, *args)

    engine.module.activation_checkpoint_func = counted_checkpoint
    return per_micro_batch


# ---------------------------------------------------------------------------------------- many layouts


class UnitActivations:
    """A stage's activations summed from one-block units, each distinct block traced once.

    A unit is a stage of the ``num_layers``-stage pipeline: one block (the first unit also embeds,
    the last also holds the final norm, the head, the MTP modules and the loss). What a stage saves
    is the sum of what its units save (a block saves its own input; no storage is saved by two
    blocks), so a search over many layouts traces each distinct block once per micro-batch size
    instead of every stage of every layout. Blocks are the same when their modules print the same
    and they attend alike (window, chunk, RoPE or not). :func:`predict_activation_bytes` traces a
    stage whole; the two agree except at PP = 1 with multi-token prediction, where the plain model's
    loss saves slightly other tensors than the pipeline's.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.num_units = config.num_layers
        self._signatures: list[tuple] | None = None
        self._traced: dict[tuple, ActivationBytes] = {}

    def signature(self, unit: int) -> tuple:
        if self._signatures is None:
            family = pipeline_family(self.config)
            sigs = []
            for i in range(self.num_units):
                stage = build_stage(self.config, self.num_units, i, ep=1)
                blocks = [f for f in stage.forward_funcs if type(f).__name__ == family.block]
                attends = ()
                if isinstance(self.config, DecoderConfig):
                    attends = (self.config.layer_type(i), i in self.config.nope_layers)
                sigs.append((stage.is_first, stage.is_last, tuple(map(str, blocks)), attends))
            self._signatures = sigs
        return self._signatures[unit]

    def units_in(self, num_stages: int, stage: int) -> list[int]:
        """The units (blocks, with the layers around the first and last) that ``stage`` of ``num_stages`` holds."""
        family = pipeline_family(self.config)
        parts, unit_parts = family.parts(self.config, num_stages), family.parts(self.config, self.num_units)
        return [
            u for u in range(self.num_units) if parts[stage] <= unit_parts[u] and unit_parts[u + 1] <= parts[stage + 1]
        ]

    def unit(self, unit: int, **trace: object) -> ActivationBytes:
        key = (self.signature(unit), tuple(sorted(trace.items())))
        if key not in self._traced:
            self._traced[key] = predict_activation_bytes(self.config, num_stages=self.num_units, stage=unit, **trace)
        return self._traced[key]

    def stage(
        self,
        *,
        num_stages: int,
        stage: int,
        micro_batch: int,
        seq_len: int,
        ep: int,
        dtype: torch.dtype,
        attention: str = GPU_ATTENTION,
    ) -> ActivationBytes:
        """What :func:`predict_activation_bytes` gives for this stage, from the units it holds."""
        units = self.units_in(num_stages, stage)
        trace = dict(micro_batch=micro_batch, seq_len=seq_len, ep=ep, dtype=dtype, attention=attention)
        got = [self.unit(u, **trace) for u in units]
        checkpointing = num_stages > 1
        saved = sum(a.saved for a in got)
        return dataclasses.replace(  # the trace settings (dtype, attention, ...) are the units'
            got[0],
            saved=saved,
            saved_checkpointed=sum(a.saved_checkpointed for a in got) if checkpointing else saved,
            logits=got[-1].logits if stage == num_stages - 1 else 0,
            logits_saved=got[-1].logits_saved if stage == num_stages - 1 else 0,
            received=got[0].received if stage > 0 else 0,
            sent=got[-1].sent if stage < num_stages - 1 else 0,
            moe_rows=max(a.moe_rows for a in got),
            recompute=max(a.recompute for a in got) if checkpointing else 0,
            forward_flops=sum(a.forward_flops for a in got),
            checkpointing=checkpointing,
            stage=stage,
            num_stages=num_stages,
        )
