"""Hugging Face directory <-> topology-free checkpoint, offline, in one process (``checkpoint_tool``'s
``import-hf`` / ``export-hf``).

A converted or trained checkpoint directory holds, beside ``latest`` and its tags, ``hf_model/``:
the model's identity as a Hugging Face config (config.json of its family and the tokenizer files).
Checkpoints hold the persistent buffers too (GLM's correction bias, trained or not), so an export
carries the bias of the step it exports; ``buffers.safetensors`` is only read, for checkpoints
saved before checkpoints held buffers. Training a ``model=hf`` run writes the same folder into its
``checkpoints/``, so ``export-hf`` works from any run's checkpoint, saved at any (PP, EP, DP): the
checkpoint's tensors are full values under global expert ids, and the export only renames and
splits them.

    import-hf HF_DIR --out CKPT_DIR                       # HF -> checkpoint (weights, step 0)
    import-hf DENSE_DIR --out CKPT_DIR --upcycle-experts 8 --top-k 2   # a dense Llama/Qwen3, upcycled
    export-hf CKPT_DIR --out HF_DIR [--dtype bf16]        # checkpoint -> HF (config, shards, tokenizer)

Both write their whole output under a temporary name beside ``--out`` and rename it into place at
the end, so ``--out`` holds a complete result or nothing: a killed conversion leaves only the
temporary directory, which the next run of the same command removes (it names its writer's host
and PID; one whose process is still running is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from moe_parallel import hf
from moe_parallel.checkpoints.checkpoint import (
    CheckpointError,
    export_consolidated,
    import_consolidated,
    read_manifest,
    resolve_checkpoint,
)
from moe_parallel.checkpoints.store import clear_dead_staging, owned_staging, remove_tree, sync_dir
from moe_parallel.core.layer import MoELayer
from moe_parallel.hf.families import family, read_config_json
from moe_parallel.hf.load import TensorSource, check_source, local_tensors
from moe_parallel.hf.upcycle import UpcycledSource
from moe_parallel.hf.weights import assemble, tensor_map
from moe_parallel.models.decoder import Decoder, DecoderConfig

HF_MODEL_DIR = "hf_model"  # beside `latest` in a checkpoint directory
BUFFERS_FILE = "buffers.safetensors"  # written by earlier versions: buffers of checkpoints without them
TRAINING_FILE = "moe_parallel.json"  # how the run trained (refuses exporting an older checkpoint's lost bias)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """A conversion cannot run; the message names the argument or file and the fix."""


# ---------------------------------------------------------------- the model's HF identity


def meta_decoder(config: DecoderConfig) -> Decoder:
    """The plain model of ``config`` without memory: its names, shapes and MoE layers."""
    with torch.device("meta"):
        return Decoder(config)


def expert_parameters(model: Decoder) -> dict[str, dict[str, str]]:
    """{layer number: {"w1": canonical name, ...}}: the stacked expert parameters, as manifests list them."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            out[str(module.layer_number)] = {
                short: f"{prefix}.experts.{short}" for short, _ in module.experts.named_parameters()
            }
    return out


def buffer_names(model: Decoder) -> list[str]:
    """Persistent buffers (in the state dict, not parameters), e.g. GLM's correction bias."""
    params = {name for name, _ in model.named_parameters()}
    return [name for name in model.state_dict(keep_vars=True) if name not in params]


def read_full_state(config: DecoderConfig, source: TensorSource) -> dict[str, Tensor]:
    """Every canonical tensor of the plain model (experts stacked by global id), read from ``source``
    in its stored dtype. ``source`` is checked against ``config`` first."""
    check_source(config, source)
    fam = family(config.hf_model_type)
    state = {}
    for canonical, (_, tensor, expert_ids) in local_tensors(meta_decoder(config)).items():
        tmap = tensor_map(canonical, fam, expert_ids)
        value = assemble(tmap, {key: source.get(key) for key in tmap.hf_keys})
        if tuple(value.shape) != tuple(tensor.shape):
            raise ConversionError(
                f"{source.path}: {canonical} assembles to {list(value.shape)}, not {list(tensor.shape)}"
            )
        state[canonical] = value
    return state


def write_hf_model_dir(
    config: DecoderConfig,
    dest: str | Path,
    *,
    tokenizer_dir: str | Path | None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model's HF identity (config.json of its family, tokenizer files) to ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf.hf_config_from_decoder(config, dtype).save_pretrained(str(dest))
    hf.copy_tokenizer_files(tokenizer_dir, dest)
    return dest


def config_dtype(hf_dir: Path) -> torch.dtype:
    """The dtype config.json declares (``dtype`` / ``torch_dtype``); fp32 when absent."""
    raw = read_config_json(hf_dir)
    value = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), None)
    return value if isinstance(value, torch.dtype) else torch.float32


# ---------------------------------------------------------------- import-hf


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tag: str = "imported",
    upcycle_experts: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> Path:
    """An HF model directory (or, upcycled, a dense Llama/Qwen3 one) as a topology-free checkpoint.

    Writes ``out/<tag>/`` (weights at step 0, loadable at any layout), ``out/latest`` and
    ``out/hf_model/``. Returns the checkpoint's directory.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if (upcycle_experts is None) != (top_k is None):
        raise ConversionError(
            "--upcycle-experts and --top-k go together: give both to upcycle a dense model, or neither"
        )
    _require_new_or_empty(out, "a checkpoint")
    source_dtype = config_dtype(hf_dir)
    if upcycle_experts is not None:
        config = hf.upcycle_config(hf_dir, num_experts=upcycle_experts, top_k=top_k)
        source: TensorSource = UpcycledSource(hf.SafetensorsDir(hf_dir), config, seed)
    else:
        config = hf.load_config(hf_dir)
        source = hf.SafetensorsDir(hf_dir)
    state = read_full_state(config, source)  # checks every tensor before writing anything
    model = meta_decoder(config)
    with _written_whole(out) as staging:
        import_consolidated(state, expert_parameters(model), staging, tag, buffers=buffer_names(model))
        write_hf_model_dir(config, staging / HF_MODEL_DIR, tokenizer_dir=hf_dir, dtype=source_dtype)
    return out / tag


def _require_new_or_empty(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = sorted(p.name for p in out.iterdir())[:4] if out.is_dir() else "a file"
        raise ConversionError(f"--out {out} already holds {held}: choose a new or empty directory for {what}")


@contextlib.contextmanager
def _written_whole(out: Path) -> Iterator[Path]:
    """A fresh directory to write ``out`` into, renamed to ``out`` when the body succeeds; removed when
    it fails. Leftovers of earlier runs killed on this host are removed first."""
    clear_dead_staging(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = owned_staging(out)
    staging.mkdir()
    try:
        yield staging
        sync_dir(staging)
        os.replace(staging, out)  # onto a missing or empty directory: atomic
        sync_dir(out.parent)
    finally:
        remove_tree(staging)


# ---------------------------------------------------------------- export-hf


def find_hf_model_dir(checkpoint: Path, root: Path) -> Path | None:
    """``hf_model/`` beside ``latest`` (the directory given, or the parent of a tag directory)."""
    for folder in (root, checkpoint.parent, checkpoint):
        if (folder / HF_MODEL_DIR / "config.json").is_file():
            return folder / HF_MODEL_DIR
    return None


def export_hf(
    ckpt_dir: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
    hf_config: str | Path | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the checkpoint in ``ckpt_dir`` (``latest`` or ``tag``) as an HF model directory ``out``.

    The model config comes from ``hf_config`` (an HF directory with config.json, and the tokenizer
    files to copy), default ``hf_model/`` beside the checkpoint. ``dtype`` defaults to the one its
    config.json declares.
    """
    root, out = Path(ckpt_dir), Path(out)
    _require_new_or_empty(out, "the Hugging Face model")
    path = resolve_checkpoint(root, tag) if (root / "latest").exists() or tag else None
    if path is None:
        if (root / "manifest.json").is_file():
            path = root
        else:
            raise CheckpointError(
                f"{root} has no 'latest' file and no manifest.json: pass --tag, or a checkpoint directory"
            )
    identity = Path(hf_config) if hf_config is not None else find_hf_model_dir(path, root)
    if identity is None:
        raise ConversionError(
            f"no {HF_MODEL_DIR}/config.json beside {path}: the checkpoint was not made by import-hf or a model=hf "
            "run; pass --hf-config with the Hugging Face directory the model was started from"
        )
    config = hf.load_config(identity)
    model = meta_decoder(config)
    state = export_consolidated(path)  # the buffers too, for a checkpoint that holds them
    names = {name for name in model.state_dict(keep_vars=True)}
    missing = sorted(names - set(state))
    if "buffers" not in read_manifest(path, check_files=False):
        missing = _older_checkpoint_buffers(path, identity, state, missing)
    extra = sorted(set(state) - names)
    if missing or extra:
        raise ConversionError(
            f"checkpoint {path} does not match {identity}/config.json: missing {missing[:6]}, unexpected {extra[:6]}; "
            "pass --hf-config with the model the run was started from"
        )
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConversionError(
                f"checkpoint {path}: {name} has shape {list(state[name].shape)}, {identity}/config.json implies "
                f"{list(tensor.shape)}; pass --hf-config with the model the run was started from"
            )
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    with _written_whole(out) as staging:
        hf.save_state_dict(
            state, config, staging, dtype=dtype or config_dtype(identity), tokenizer_dir=identity, **kwargs
        )
    return out


def _older_checkpoint_buffers(path: Path, identity: Path, state: dict[str, Tensor], missing: list[str]) -> list[str]:
    """A checkpoint saved before checkpoints held buffers: take them from ``hf_model/buffers.safetensors``
    (their values at the start of the run), unless the run trained them. Returns what is still missing."""
    from safetensors.torch import load_file

    trained = json.loads((identity / TRAINING_FILE).read_text()) if (identity / TRAINING_FILE).is_file() else {}
    if trained.get("expert_bias_update_rate", 0) > 0:
        raise ConversionError(
            f"checkpoint {path} predates buffers in checkpoints, and {identity}/{TRAINING_FILE} says the run trained "
            f"the routers' expert_bias (moe.expert_bias_update_rate={trained['expert_bias_update_rate']}): the bias "
            "it learned is lost, so the export would route differently; export a checkpoint saved by this version"
        )
    file = identity / BUFFERS_FILE
    saved = load_file(str(file)) if file.is_file() else {}
    for name in [n for n in missing if n in saved]:
        state[name] = saved[name]
    return [n for n in missing if n not in saved]


def describe(path: Path) -> str:
    """One line about an HF directory written by :func:`export_hf`."""
    index = path / "model.safetensors.index.json"
    shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1
    return f"{path}: {read_config_json(path).get('architectures', ['?'])[0]}, {shards} shard(s)"


# ---------------------------------------------------------------- command line (registered by checkpoint_tool)

ERRORS: tuple[type[Exception], ...] = (ConversionError, hf.HFConversionError)


QUANTIZED_NOTE = (
    "export-hf writes bf16 (or --dtype) tensors and a config.json without quantization_config: "
    "re-quantize the export yourself if you need the quantized format"
)


def quantization_note(hf_dir: str | Path) -> str | None:
    """A line for a quantized source (its weights are dequantized on read); None for any other."""
    method = hf.SafetensorsDir(hf_dir).quantization
    if method is None:
        return None
    return f"{hf_dir} is quantized ({method}): its weights were dequantized to bf16 on read; {QUANTIZED_NOTE}"


def cmd_import_hf(args: argparse.Namespace) -> None:
    path = import_hf(
        args.hf_dir, args.out, tag=args.tag, upcycle_experts=args.upcycle_experts, top_k=args.top_k, seed=args.seed
    )
    what = f"upcycled to {args.upcycle_experts} experts, top-{args.top_k}" if args.upcycle_experts else "weights"
    print(f"wrote {path} ({what}; step 0, optimizer starts fresh) and {Path(args.out) / HF_MODEL_DIR}/")
    note = quantization_note(args.hf_dir)
    if note is not None:
        print(note)


def cmd_export_hf(args: argparse.Namespace) -> None:
    max_shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None
    out = export_hf(args.dir, args.out, tag=args.tag, dtype=dtype, hf_config=args.hf_config, max_shard_bytes=max_shard)
    print(f"wrote {describe(out)}")
    if args.hf_config is not None and read_config_json(args.hf_config).get("quantization_config") is not None:
        print(f"{args.hf_config} is quantized: {QUANTIZED_NOTE}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add ``import-hf`` and ``export-hf`` to an argparse sub-parser set; returns {name: handler}."""
    imp = sub.add_parser("import-hf", help="a Hugging Face model directory -> a topology-free checkpoint")
    imp.add_argument("hf_dir", help="config.json + model.safetensors (or shards with an index)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--tag", default="imported")
    imp.add_argument("--upcycle-experts", type=_positive_int, help="upcycle a dense Llama/Qwen3 to this many experts")
    imp.add_argument("--top-k", type=_positive_int, help="experts per token of the upcycled model")
    imp.add_argument("--seed", type=int, default=0, help="seed of the upcycled routers")
    exp = sub.add_parser("export-hf", help="a checkpoint (any run, any layout) -> a Hugging Face model directory")
    exp.add_argument("dir", help="checkpoint directory (with 'latest'), or one checkpoint's directory")
    exp.add_argument("--tag")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: config.json's dtype")
    exp.add_argument(
        "--hf-config", help=f"HF directory with the model's config.json (default: {HF_MODEL_DIR}/ beside it)"
    )
    exp.add_argument("--max-shard-mb", type=float, help="largest safetensors shard (default 5 GiB)")
    return {"import-hf": cmd_import_hf, "export-hf": cmd_export_hf}
