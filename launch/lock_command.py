"""``checkpoint_tool lock RUN_DIR [--break | --force]``: who holds a run directory's lock, whether
that job is provably gone, and removing the lock (the protocol is :mod:`launch.run_lock`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.lock_holder import ALIVE, GONE, UNKNOWN
from launch.run_lock import LOCK_FILE, LockState, RunLockError, break_lock, inspect


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``lock`` to ``launch.checkpoint_tool``'s sub-commands."""
    lock = sub.add_parser("lock", help="who holds a run directory, and whether provably gone; --break / --force")
    lock.add_argument("dir", help="the run directory (or its run.lock)")
    group = lock.add_mutually_exclusive_group()
    group.add_argument(
        "--break", dest="break_", action="store_true", help="remove a lock whose holder is provably gone"
    )
    group.add_argument("--force", action="store_true", help="remove the lock even if its holder may still run")
    lock.set_defaults(func=cmd_lock)


def cmd_lock(args: argparse.Namespace) -> int:
    """``checkpoint_tool lock DIR [--break | --force]``: 0 when done, 2 on an error."""
    directory = Path(args.dir)
    if directory.name == LOCK_FILE:
        directory = directory.parent
    try:
        if not directory.is_dir():
            raise RunLockError(f"{directory} is not a directory")
        state = inspect(directory)
        if state is None:
            print(f"{directory}: not locked")
            return 0
        _print_state(state)
        if not (args.break_ or args.force):
            return 0
        if args.force and not state.verdict.stale:
            print(
                f"warning: removing a lock whose holder cannot be proven gone ({state.verdict.reason}): if it still "
                f"runs, two jobs now write {directory}",
                file=sys.stderr,
            )
        broken = break_lock(directory, force=args.force)
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"removed {state.path}" if broken is not None else f"{directory}: not locked any more")
    return 0


def _print_state(state: LockState) -> None:
    holder = state.holder.describe() if state.holder else f"a record that cannot be read ({state.problem})"
    print(f"{state.path}: held by {holder}")
    hint = {
        ALIVE: "",
        GONE: " (--break removes the lock)",
        UNKNOWN: " (--force removes the lock once you have made sure that job has ended)",
    }[state.verdict.state]
    label = {ALIVE: "alive", GONE: "stale", UNKNOWN: "unknown"}[state.verdict.state]
    print(f"{label}: {state.verdict.reason}{hint}")
