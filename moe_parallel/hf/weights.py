"""Weight-name mapping: our canonical (plain :class:`Decoder`) tensor names <-> Hugging Face keys.

Most tensors are a rename. Expert weights differ in layout: ours are stacked per layer,
``w1[e] = [gate | up]`` as ``[D, 2F]`` and ``w2[e]`` as ``[F, D]``; most families store one
``experts.<id>.<gate|up|down>`` matrix per expert in ``nn.Linear`` layout (``[F, D]``, ``[D, F]``),
as transformers' ``save_pretrained`` writes them, while Llama 4 and GPT-OSS store all experts of a
layer in one tensor of our layout (GPT-OSS with gate and up columns interleaved). Both directions are
transposes, concatenations and column permutations, so a round trip is bit-exact.

DeepSeek-V3's multi-token-prediction modules (models/mtp.py) sit in the checkpoint as the layers
after the last block, ``model.layers.{j}`` with ``j = num_hidden_layers + k - 1``: our
``mtp.{j}.block.*`` is mapped as ``blocks.{j}.*``, and ``mtp.{j}.{enorm,hnorm,eh_proj,head_norm}``
to ``model.layers.{j}.{enorm,hnorm,eh_proj,shared_head.norm}``. Each such layer also stores a copy of
the embedding and of the output head (:func:`mtp_copy_keys`), which we hold once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .families import Family

_RENAMES = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"final_norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.(.+)", r"model.layers.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.ffn\.((?:gate|up|down)_proj\.weight)", r"model.layers.\1.{dense}.\2"),
    (r"blocks\.(\d+)\.ffn\.router\.(weight|bias)", r"model.layers.\1.{moe}.{router}.\2"),
    (r"blocks\.(\d+)\.ffn\.router\.expert_bias", r"model.layers.\1.{moe}.{router}.e_score_correction_bias"),
    (r"blocks\.(\d+)\.ffn\.shared_gate\.weight", r"model.layers.\1.mlp.shared_expert_gate.weight"),
    (r"mtp\.(\d+)\.(enorm|hnorm|eh_proj)\.weight", r"model.layers.\1.\2.weight"),
    (r"mtp\.(\d+)\.head_norm\.weight", r"model.layers.\1.shared_head.norm.weight"),
)
_MTP_BLOCK = re.compile(r"mtp\.(\d+)\.block\.(.+)")
_STACKED = re.compile(r"blocks\.(\d+)\.ffn\.(experts|shared_expert)\.(w1|w2|b1|b2)")
# Fused experts (Llama 4, GPT-OSS): one tensor per layer, experts along dim 0, ``[E, D, 2F]`` /
# ``[E, F, D]`` / ``[E, 2F]`` / ``[E, D]``: our layout, except GPT-OSS's interleaved gate/up columns.
_FUSED_NAMES = {"w1": "gate_up_proj", "w2": "down_proj", "b1": "gate_up_proj_bias", "b2": "down_proj_bias"}


@dataclass(frozen=True)
class TensorMap:
    """How one of our tensors is made of HF tensors.

    ``kind`` is ``"rename"`` (one HF tensor, same layout), ``"stacked"`` (``keys[j]`` are the HF
    keys of row ``j`` of a stacked expert tensor: ``(gate, up)`` for ``w1``, ``(down,)`` for
    ``w2``, in ``nn.Linear`` layout) or ``"fused"`` (rows ``rows`` of one HF tensor holding all
    experts; ``interleaved``: its gate/up columns alternate).
    """

    canonical: str
    keys: tuple[tuple[str, ...], ...]
    kind: str
    part: str = ""  # "w1", "w2", "b1" or "b2" for expert tensors
    rows: range | None = None
    interleaved: bool = False

    @property
    def stacked(self) -> bool:
        return self.kind == "stacked"

    @property
    def hf_keys(self) -> list[str]:
        return [key for row in self.keys for key in row]


def tensor_map(canonical: str, fam: Family, expert_ids: range | None = None) -> TensorMap | None:
    """The HF keys of canonical tensor ``canonical`` (``expert_ids``: the global ids its rows hold).

    None for tensors that have no HF counterpart (none exist in a supported config).
    """
    match = _MTP_BLOCK.fullmatch(canonical)
    if match is not None:  # an MTP module's block is stored as the layer it is numbered as
        tmap = tensor_map(f"blocks.{match.group(1)}.{match.group(2)}", fam, expert_ids)
        return None if tmap is None else replace(tmap, canonical=canonical)
    match = _STACKED.fullmatch(canonical)
    if match is not None:
        layer, which, part = match.groups()
        if which == "experts" and fam.fused_experts:
            key = f"model.layers.{layer}.{fam.moe_module}.experts.{_FUSED_NAMES[part]}"
            interleaved = fam.interleaved_gate_up and part in ("w1", "b1")
            return TensorMap(canonical, ((key,),), "fused", part, expert_ids, interleaved)
        if part in ("b1", "b2"):
            return None
        gate, up, down = fam.expert_proj
        if which == "experts":
            prefix = f"model.layers.{layer}.{fam.moe_module}.experts"
            rows = [f"{prefix}.{j}." for j in expert_ids]
        else:
            if fam.shared_module is None:
                return None
            rows = [f"model.layers.{layer}.{fam.moe_module}.{fam.shared_module}."]
            gate, up, down = "gate_proj", "up_proj", "down_proj"
        names = (gate, up) if part == "w1" else (down,)
        return TensorMap(canonical, tuple(tuple(f"{row}{n}.weight" for n in names) for row in rows), "stacked", part)
    for pattern, template in _RENAMES:
        if re.fullmatch(pattern, canonical):
            key = re.sub(pattern, template, canonical)
            key = key.replace("{moe}", fam.moe_module).replace("{dense}", fam.dense_module)
            return TensorMap(canonical, ((key.replace("{router}", fam.router_module),),), "rename")
    return None


def mtp_copy_keys(num_layers: int, mtp_layers: int, tie_embeddings: bool) -> dict[str, str]:
    """HF key of each MTP layer's embedding and output-head copy -> the HF key it copies."""
    head = "model.embed_tokens.weight" if tie_embeddings else "lm_head.weight"
    out = {}
    for j in range(num_layers, num_layers + mtp_layers):
        out[f"model.layers.{j}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{j}.shared_head.head.weight"] = head
    return out


def expected_hf_shapes(tmap: TensorMap, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """HF key -> shape, for our tensor of ``shape`` (all rows of a stacked or fused tensor)."""
    if not tmap.stacked:
        return {tmap.keys[0][0]: tuple(shape)}
    _, rows, cols = shape
    if tmap.part == "w1":  # [e, D, 2F] <- gate, up: [F, D] each
        per = (cols // 2, rows)
    else:  # [e, F, D] <- down: [D, F]
        per = (cols, rows)
    return {key: per for row in tmap.keys for key in row}


def _interleave(gate_up: Tensor) -> Tensor:
    """``[gate | up]`` halves -> alternating ``gate0, up0, gate1, up1, ...`` columns."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


def _deinterleave(columns: Tensor) -> Tensor:
    return torch.cat((columns[..., 0::2], columns[..., 1::2]), dim=-1)


def assemble(tmap: TensorMap, tensors: dict[str, Tensor]) -> Tensor:
    """Our tensor from its HF tensors (``tensors`` holds every key of ``tmap``; a fused key holds
    the rows ``tmap.rows``, or all experts' rows)."""
    if tmap.kind == "rename":
        return tensors[tmap.keys[0][0]]
    if tmap.kind == "fused":
        value = tensors[tmap.keys[0][0]]
        if tmap.rows is not None and value.shape[0] != len(tmap.rows):  # given all experts: take ours
            value = value[tmap.rows.start : tmap.rows.stop]
        return _deinterleave(value) if tmap.interleaved else value
    rows = [torch.cat([tensors[key].t() for key in row], dim=1) for row in tmap.keys]
    return torch.stack(rows)


def disassemble(tmap: TensorMap, tensor: Tensor) -> dict[str, Tensor]:
    """HF key -> contiguous tensor, for our tensor (the inverse of :func:`assemble`; a fused key gets
    the rows this tensor holds)."""
    if tmap.kind == "rename":
        return {tmap.keys[0][0]: tensor.contiguous()}
    if tmap.kind == "fused":
        return {tmap.keys[0][0]: (_interleave(tensor) if tmap.interleaved else tensor).contiguous()}
    out = {}
    for j, row in enumerate(tmap.keys):
        parts = tensor[j].chunk(len(row), dim=1)
        for key, part in zip(row, parts):
            out[key] = part.t().contiguous()
    return out
