"""Hugging Face directory <-> topology-free checkpoint, offline, in one process: the ``import-hf`` and
``export-hf`` commands of ``launch.checkpoint_tool`` (the conversions are :mod:`launch.hf_import`
and :mod:`launch.hf_export`).

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

Both stream: the import reads one tensor (or one expert: its gate, up and down) at a time, assembles
it and writes its file; the export gathers one safetensors shard at a time from the checkpoint files
it needs. Memory holds about one shard plus one tensor, whatever the model's size. Tensors keep the
source's dtype unless ``--dtype`` asks for another (the family's float32 tensors stay float32).

Both write under a fixed staging directory beside ``--out`` (``.<name>.tmp-resume/``, see
:mod:`moe_parallel.checkpoints.resumable`) and rename it into place at the end, so ``--out`` holds a
complete result or nothing. A killed conversion leaves its finished files there with a journal: the
same command again checks them (size and CRC-32) and continues; another command on the same
``--out`` discards them and says so; a conversion still running is refused. The disk space the
output needs (from the headers, less what a resumed run has) is checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from launch.hf_export import describe, export_hf
from launch.hf_identity import HF_MODEL_DIR, QUANTIZED_SOURCE_FILE, ConversionError, find_hf_model_dir
from launch.hf_import import import_hf
from moe_parallel import hf
from moe_parallel.hf.families import read_config_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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
    """``checkpoint_tool import-hf``: convert, then say what was written (and whether it was dequantized)."""
    path = import_hf(
        args.hf_dir,
        args.out,
        tag=args.tag,
        upcycle_experts=args.upcycle_experts,
        top_k=args.top_k,
        seed=args.seed,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    what = f"upcycled to {args.upcycle_experts} experts, top-{args.top_k}" if args.upcycle_experts else "weights"
    print(f"wrote {path} ({what}; step 0, optimizer starts fresh) and {Path(args.out) / HF_MODEL_DIR}/")
    note = quantization_note(args.hf_dir)
    if note is not None:
        print(note)


def cmd_export_hf(args: argparse.Namespace) -> None:
    """``checkpoint_tool export-hf``: convert, then say what was written (and that quantization is not redone)."""
    max_shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None
    out = export_hf(args.dir, args.out, tag=args.tag, dtype=dtype, hf_config=args.hf_config, max_shard_bytes=max_shard)
    print(f"wrote {describe(out)}")
    if args.hf_config is not None and read_config_json(args.hf_config).get("quantization_config") is not None:
        print(f"{args.hf_config} is quantized: {QUANTIZED_NOTE}")
    elif args.hf_config is None:
        identity = find_hf_model_dir(Path(args.dir), Path(args.dir))
        record = identity / QUANTIZED_SOURCE_FILE if identity is not None else None
        if record is not None and record.is_file():
            method = json.loads(record.read_text()).get("quantization")
            print(f"the checkpoint was imported from a quantized ({method}) model: {QUANTIZED_NOTE}")


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
    imp.add_argument(
        "--dtype", choices=sorted(DTYPES), help="store the tensors in this dtype (default: each keeps the source's)"
    )
    exp = sub.add_parser("export-hf", help="a checkpoint (any run, any layout) -> a Hugging Face model directory")
    exp.add_argument("dir", help="checkpoint directory (with 'latest'), or one checkpoint's directory")
    exp.add_argument("--tag")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: config.json's dtype")
    exp.add_argument(
        "--hf-config", help=f"HF directory with the model's config.json (default: {HF_MODEL_DIR}/ beside it)"
    )
    exp.add_argument(
        "--max-shard-mb", type=float, help="largest safetensors shard, in MiB (default 5 GiB; memory holds about one)"
    )
    return {"import-hf": cmd_import_hf, "export-hf": cmd_export_hf}
