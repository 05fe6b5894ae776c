"""Offline checkpoint tool: verify, export consolidated weights, import them back.

Checkpoints are topology-free (experts under global ids), so there is nothing to reshard: any
checkpoint loads at any PP / EP / DP layout. This tool converts between that format and one plain
state dict (the model at PP=1, EP=1), e.g. for evaluation, for publishing, or to start fine-tuning
elsewhere from weights alone.

    python -m launch.checkpoint_tool verify runs/x/checkpoints [--all]   # every file's size and checksum
    python -m launch.checkpoint_tool export runs/x/checkpoints --out model.pt [--dtype bf16]
    python -m launch.checkpoint_tool import model.pt --out new_ckpts [--tag imported]
    python -m launch.checkpoint_tool migrate runs/x/checkpoints --trust  # earlier formats -> tensors and plain data
    python -m launch.checkpoint_tool lock runs/x [--break | --force]     # the job that holds a run directory
    python -m launch.checkpoint_tool import-hf HF_DIR --out CKPT_DIR [--upcycle-experts E --top-k K]
    python -m launch.checkpoint_tool export-hf CKPT_DIR --out HF_DIR [--dtype bf16]

DIR is a checkpoints folder (the checkpoint ``latest`` names, or ``--tag``) or one checkpoint.
Every file is read as tensors and plain data (``weights_only=True``): a file that holds anything else
is refused by name, and nothing from it runs. ``migrate --trust`` is the one command that unpickles
fully, once, to convert checkpoints of earlier formats. Outputs (``export``'s weights and their
``.json``) are written under a temporary name and renamed, so a kill keeps the previous ones.
Exit status: 0 when all is well, 2 on any fault (a corrupt or missing file, a damaged manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from launch import hf_convert, lock_command
from moe_parallel.checkpoints.checkpoint import (
    CheckpointError,
    export_consolidated,
    import_consolidated,
    list_checkpoints,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
)
from moe_parallel.checkpoints.migrate import migrate_folder
from moe_parallel.checkpoints.safe_files import UnsafeFileError, load_plain
from moe_parallel.checkpoints.store import check_file, clear_interrupted, publish_file, publish_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _checkpoint(directory: str, tag: str | None) -> Path:
    if not Path(directory).exists():
        raise CheckpointError(f"{directory} does not exist")
    path = resolve_checkpoint(directory, tag)
    if path is None:
        raise CheckpointError(f"{directory} has no 'latest' file: pass --tag, or point at a checkpoint directory")
    return path


def cmd_verify(args: argparse.Namespace) -> int:
    for trash in clear_interrupted(args.dir, saves=False):  # checkpoints a killed rotation was deleting
        print(f"removed {trash} (left by a rotation that was cut short)")
    if args.all:
        paths = [c.path for c in list_checkpoints(args.dir)]
        if not paths:
            raise CheckpointError(f"{args.dir} holds no checkpoint")
    else:
        paths = [_checkpoint(args.dir, args.tag)]
    faults = 0
    for path in paths:
        try:
            manifest, problems = verify_checkpoint(path)
        except CheckpointError as err:
            print(f"{path}: FAULT: {err}")
            faults += 1
            continue
        files = manifest["files"]
        size = sum(entry["bytes"] for entry in files.values())
        checked = all("crc32" in entry for entry in files.values())
        head = f"{path}: step {manifest['step']}, {len(files)} files, {size / 2**20:.1f} MiB"
        if problems:
            faults += 1
            print(f"{head}: FAULT in {len(problems)} file{'s' if len(problems) > 1 else ''}")
            for problem in problems:
                print(f"  {problem}")
            continue
        print(f"{head}, {'all checksums match' if checked else 'all present (format 1: no checksums to check)'}")
        for layer, ids in manifest["moe_layers"].items():
            print(f"  MoE layer {layer}: {len(ids)} experts")
    return 2 if faults else 0


def cmd_export(args: argparse.Namespace) -> int:
    path = _checkpoint(args.dir, args.tag)
    manifest = read_manifest(path)
    state = export_consolidated(path, DTYPES[args.dtype])  # checks every file's checksum
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = publish_file(state, out)
    meta = {
        "source": str(path),
        "step": manifest["step"],
        "expert_parameters": manifest["expert_parameters"],
        "buffers": manifest.get("buffers", []),  # which tensors are buffers (e.g. routers' expert_bias)
        "weights": weights,  # the size and checksum of the file beside it: import checks the pair
    }
    publish_text(json.dumps(meta, indent=1), _meta_path(out))
    print(f"wrote {out} ({len(state)} tensors, {args.dtype}) and {out.name}.json")
    return 0


def _meta_path(weights: Path) -> Path:
    return weights.with_name(weights.name + ".json")


def cmd_import(args: argparse.Namespace) -> int:
    weights = Path(args.file)
    meta_path = _meta_path(weights)
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist")
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} not found: it is written by 'export' beside the weights")
    try:
        meta = json.loads(meta_path.read_text())
        expert_parameters = meta["expert_parameters"]
        buffers = list(meta.get("buffers", []))  # absent in an export made before buffers were kept
        entry = meta.get("weights")  # absent in an export made before exports recorded it
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{meta_path} is damaged ({err}): export the weights again") from err
    if entry is not None:
        try:
            check_file(weights.parent, weights.name, entry)
        except (CheckpointError, TypeError, KeyError) as err:
            raise CheckpointError(
                f"{weights} does not match {meta_path.name} ({err}): the file is damaged, or an export was cut "
                "short between writing the two; export the weights again"
            ) from None
    try:
        state = load_plain(weights)
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}: export it again from a checkpoint, or load it only if you trust it") from None
    except Exception as err:  # a truncated or damaged file (e.g. an export without a checksum record)
        raise CheckpointError(f"{weights} cannot be read ({type(err).__name__}: {err}): export it again") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{weights} is not a state dict of tensors (one that 'export' writes)")
    path = import_consolidated(state, expert_parameters, args.out, args.tag, buffers=buffers)
    print(f"wrote {path} (weights only; optimizer starts fresh)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    for done in migrate_folder(args.dir, trust=args.trust):
        if done.resumed:
            what = f"finished an interrupted migration ({len(done.converted)} file(s) were left to rename)"
        elif done.converted:
            what = f"format {done.from_version} -> 3, rewrote {', '.join(done.converted)}"
        else:
            what = f"format {done.from_version}: nothing to convert (`verify` checks its files)"
        print(f"{done.path}: {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """One subparser per command; each sets ``func`` (a new command is one more ``add_parser`` block)."""
    parser = argparse.ArgumentParser(prog="python -m launch.checkpoint_tool", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every file of the manifest: present, its size, its checksum")
    verify.add_argument("dir")
    verify.add_argument("--tag")
    verify.add_argument("--all", action="store_true", help="every checkpoint in the folder, not just the latest")
    verify.set_defaults(func=cmd_verify)
    export = sub.add_parser("export", help="write one consolidated state dict (the PP=1, EP=1 model's)")
    export.add_argument("dir")
    export.add_argument("--tag")
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    export.set_defaults(func=cmd_export)
    imp = sub.add_parser("import", help="turn an exported state dict back into a loadable checkpoint")
    imp.add_argument("file")
    imp.add_argument("--out", required=True)
    imp.add_argument("--tag", default="imported")
    imp.set_defaults(func=cmd_import)
    migrate = sub.add_parser(
        "migrate", help="convert checkpoints of earlier formats, once, to files that load without running code"
    )
    migrate.add_argument("dir", help="a checkpoints folder (every checkpoint in it) or one checkpoint")
    migrate.add_argument(
        "--trust",
        action="store_true",
        help="required: old files are read with pickle, which runs any code they name; only for checkpoints you trust",
    )
    migrate.set_defaults(func=cmd_migrate)
    for name, handler in hf_convert.add_commands(sub).items():  # import-hf / export-hf
        sub.choices[name].set_defaults(func=lambda args, handler=handler: handler(args) or 0)
    lock_command.add_commands(sub)  # lock: who holds a run directory; --break / --force
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, *hf_convert.ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
