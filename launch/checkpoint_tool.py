"""Offline checkpoint tool: verify, export consolidated weights, import them back.

Checkpoints are topology-free (experts under global ids), so there is nothing to reshard: any
checkpoint loads at any PP / EP / DP layout. This tool converts between that format and one plain
state dict (the model at PP=1, EP=1), e.g. for evaluation, for publishing, or to start fine-tuning
elsewhere from weights alone.

    python -m launch.checkpoint_tool verify runs/x/checkpoints
    python -m launch.checkpoint_tool export runs/x/checkpoints --out model.pt [--dtype bf16]
    python -m launch.checkpoint_tool import model.pt --out new_ckpts [--tag imported]
    python -m launch.checkpoint_tool import-hf HF_DIR --out CKPT_DIR [--upcycle-experts E --top-k K]
    python -m launch.checkpoint_tool export-hf CKPT_DIR --out HF_DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from launch import hf_convert
from moe_parallel.checkpoint import (
    CheckpointError,
    export_consolidated,
    import_consolidated,
    read_manifest,
    resolve_checkpoint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _checkpoint(directory: str, tag: str | None) -> Path:
    path = resolve_checkpoint(directory, tag)
    if path is None:
        raise CheckpointError(f"{directory} has no 'latest' file: pass --tag, or point at a checkpoint directory")
    return path


def cmd_verify(args: argparse.Namespace) -> None:
    path = _checkpoint(args.dir, args.tag)
    manifest = read_manifest(path)
    layers = manifest["moe_layers"]
    total = sum(manifest["files"].values())
    print(f"{path}: step {manifest['step']}, {len(manifest['files'])} files, {total / 2**20:.1f} MiB, all present")
    for layer, ids in layers.items():
        print(f"  MoE layer {layer}: {len(ids)} experts")


def cmd_export(args: argparse.Namespace) -> None:
    path = _checkpoint(args.dir, args.tag)
    manifest = read_manifest(path)
    state = export_consolidated(path, DTYPES[args.dtype])
    out = Path(args.out)
    torch.save(state, out)
    meta = {"source": str(path), "step": manifest["step"], "expert_parameters": manifest["expert_parameters"]}
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} ({len(state)} tensors, {args.dtype}) and {out.name}.json")


def cmd_import(args: argparse.Namespace) -> None:
    meta_path = Path(args.file + ".json")
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} not found: it is written by 'export' beside the weights")
    meta = json.loads(meta_path.read_text())
    state = torch.load(args.file, map_location="cpu", weights_only=True)
    path = import_consolidated(state, meta["expert_parameters"], args.out, args.tag)
    print(f"wrote {path} (weights only; optimizer starts fresh)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.checkpoint_tool", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check that every file of the manifest is present and whole")
    verify.add_argument("dir")
    verify.add_argument("--tag")
    export = sub.add_parser("export", help="write one consolidated state dict (the PP=1, EP=1 model's)")
    export.add_argument("dir")
    export.add_argument("--tag")
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    imp = sub.add_parser("import", help="turn an exported state dict back into a loadable checkpoint")
    imp.add_argument("file")
    imp.add_argument("--out", required=True)
    imp.add_argument("--tag", default="imported")
    commands = {"verify": cmd_verify, "export": cmd_export, "import": cmd_import}
    commands.update(hf_convert.add_commands(sub))  # import-hf / export-hf
    args = parser.parse_args(argv)
    try:
        commands[args.command](args)
    except (CheckpointError, *hf_convert.ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
