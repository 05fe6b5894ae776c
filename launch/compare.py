"""Compare training runs: a table of final / min / mean per metric, and one PNG with a line per run.

    python -m launch.compare RUN [RUN ...] [--metrics train/loss moe/layer_1/balance_loss] [--out compare.png]

Each RUN is one of:

- a run directory with ``metrics.jsonl`` (the mirror :class:`launch.wandb_logger.RunLogger`
  writes next to W&B);
- a directory holding W&B offline runs (``wandb/offline-run-*/run-*.wandb`` below it), an
  ``offline-run-*`` directory itself, or a ``.wandb`` file. A resumed run leaves one offline-run
  directory per job; they are read in time order and joined.

``--source wandb`` reads the ``.wandb`` files even where a ``metrics.jsonl`` exists.

Reading ``.wandb`` files: they are W&B's transaction log, a LevelDB-style log of protobuf
``wandb.proto.wandb_internal_pb2.Record`` messages (the format ``wandb sync`` uploads). The file
starts with a 7-byte header (``:W&B``, magic 0xBEE1, version 0); then come 32 KiB blocks of chunks,
each with a 7-byte header: CRC-32 (zlib's, of the type byte then the data), length (uint16) and type
(FULL, or FIRST / MIDDLE / LAST pieces of a record split across blocks). wandb (0.31) ships no
Python reader (``wandb.sdk.internal.datastore`` does not exist; its reader lives in the Go ``wandb-core``,
reachable only through ``wandb leet inspect``), so :func:`iter_wandb_records` walks the chunks here,
checks every CRC, and decodes each record with wandb's own protobuf classes. History records
(``Record.history``) carry the logged values as items keyed by name (or a nested key, joined with
``.``) whose value is typed (newer wandb) or JSON (``value_json``).

When a run is resumed from a checkpoint it logs some steps again; the later values replace the
earlier ones from that step on, per metric.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("train/loss", "moe/balance_loss")

# --- the .wandb transaction log ------------------------------------------------------------------

WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """A ``.wandb`` file cannot be read (not a W&B transaction log)."""


def iter_wandb_chunks(data: bytes, path: str = "<bytes>") -> Iterator[bytes]:
    """The records' payloads of a W&B transaction log, reassembled from their chunks.

    Stops (with a warning) at the first damaged chunk: the tail of a log cut short by a crash.
    """
    if not data.startswith(WANDB_HEADER):
        raise WandbLogError(f"{path}: not a W&B transaction log (header {data[:7]!r}, expected {WANDB_HEADER!r})")
    pos = len(WANDB_HEADER)
    pending: list[bytes] | None = None
    while pos < len(data):
        space = BLOCK_SIZE - pos % BLOCK_SIZE
        if space < CHUNK_HEADER.size:  # a block's tail too short for a header is padding
            pos += space
            continue
        if pos + CHUNK_HEADER.size > len(data):
            break
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += space
            continue
        start = pos + CHUNK_HEADER.size
        payload = data[start : start + length]
        if length > space - CHUNK_HEADER.size or len(payload) < length:
            _damaged(path, pos, "chunk runs past its block or the end of the file")
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            _damaged(path, pos, "CRC mismatch")
            return
        pos = start + length
        if kind == CHUNK_FULL:
            pending = None
            yield payload
        elif kind == CHUNK_FIRST:
            pending = [payload]
        elif kind in (CHUNK_MIDDLE, CHUNK_LAST) and pending is not None:
            pending.append(payload)
            if kind == CHUNK_LAST:
                yield b"".join(pending)
                pending = None
        else:
            _damaged(path, pos, f"unexpected chunk type {kind}")
            return


def _damaged(path: str, pos: int, why: str) -> None:
    warnings.warn(f"{path}: stopped reading at byte {pos}: {why} (a run cut short?)", RuntimeWarning, stacklevel=3)


def iter_wandb_records(path: str | Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_wandb_chunks(Path(path).read_bytes(), str(path)):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _item_value(item: Any) -> Any:
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    if kind is not None:
        return getattr(item, kind)
    return json.loads(item.value_json) if item.value_json else None


def _item_key(item: Any) -> str:
    return item.key if item.key else ".".join(item.nested_key)


def read_wandb_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (one per ``wandb.log`` step) of a ``.wandb`` file, with ``_step`` and the logged keys.

    Media (histograms, images) appear flattened, as W&B stores them (``key._type``, ``key.values``...).
    """
    rows = []
    for record in iter_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {_item_key(item): _item_value(item) for item in record.history.item}
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows


def read_wandb_run_info(path: str | Path) -> dict[str, Any]:
    """``run_id``, ``project``, ``group``, ``display_name`` and ``resumed`` of a ``.wandb`` file's run record."""
    for record in iter_wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "run_id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "display_name": run.display_name,
                "tags": list(run.tags),
                "resumed": bool(run.resumed),
            }
    return {}


# --- runs and their metrics ----------------------------------------------------------------------


@dataclass
class Series:
    """One metric of one run: steps and values in step order."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        """Append; a step at or before the last one (a resumed run logging again) replaces the tail."""
        if self.steps and step <= self.steps[-1]:
            keep = next((i for i, s in enumerate(self.steps) if s >= step), len(self.steps))
            del self.steps[keep:], self.values[keep:]
        self.steps.append(step)
        self.values.append(value)


@dataclass
class RunMetrics:
    """The scalar metrics of one run."""

    label: str
    source: str  # "metrics.jsonl" or "wandb"
    series: dict[str, Series] = field(default_factory=dict)

    def add_row(self, step: int, row: dict[str, Any]) -> None:
        """Add the numeric values of one logged row; W&B's bookkeeping (``_step``...) and media fields are skipped."""
        media = tuple(key[: -len("_type")] for key in row if key.endswith("._type"))  # "moe/layer_1/expert_load."
        for key, value in row.items():
            if key == "step" or key.startswith("_") or (media and key.startswith(media)):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.series.setdefault(key, Series()).add(step, float(value))


class RunNotFoundError(FileNotFoundError):
    """A RUN argument holds no metrics that compare can read."""


def wandb_files(path: Path) -> list[Path]:
    """The ``.wandb`` files of a run, oldest job first.

    ``path`` is a ``.wandb`` file, a W&B run directory (``offline-run-*`` or, for online runs, which
    keep the same log locally, ``run-*``), or a directory holding such run directories or ``wandb/``.
    """
    if path.is_file():
        return [path] if path.suffix == ".wandb" else []
    found = set(path.glob("run-*.wandb"))
    for pattern in ("offline-run-*/run-*.wandb", "run-*/run-*.wandb"):
        found |= set(path.glob(pattern)) | set(path.glob(f"wandb/{pattern}"))
    return sorted(found, key=_started_at)


def _started_at(file: Path) -> tuple[str, str]:
    """Sort key: the start time in the run directory's name (``[offline-]run-YYYYmmdd_HHMMSS-id``)."""
    match = re.search(r"(\d{8}_\d{6})", file.parent.name)
    return (match.group(1) if match else "", str(file))


def load_run(path: str | Path, source: str = "auto") -> RunMetrics:
    """Read one RUN (see the module docstring); ``source`` is ``auto``, ``jsonl`` or ``wandb``."""
    path = Path(path)
    if not path.exists():
        raise RunNotFoundError(f"{path}: no such file or directory")
    label = path.stem if path.is_file() else path.resolve().name
    jsonl = path / "metrics.jsonl"
    if source in ("auto", "jsonl") and jsonl.is_file():
        run = RunMetrics(label, "metrics.jsonl")
        bad = 0
        with jsonl.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = int(row["step"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                run.add_row(step, row)
        if bad:
            warnings.warn(f"{jsonl}: skipped {bad} unreadable line(s)", RuntimeWarning, stacklevel=2)
        return run
    files = wandb_files(path) if source in ("auto", "wandb") else []
    if not files:
        wanted = {"auto": "metrics.jsonl or wandb/offline-run-*/run-*.wandb", "jsonl": "metrics.jsonl"}
        raise RunNotFoundError(f"{path}: found no {wanted.get(source, 'wandb/offline-run-*/run-*.wandb')} in it")
    run = RunMetrics(label, "wandb")
    for file in files:
        for row in read_wandb_history(file):
            run.add_row(int(row.get("_step", 0)), row)
    return run


def unique_labels(runs: Sequence[RunMetrics], paths: Sequence[str]) -> None:
    """Make run labels unique by falling back to the given paths where names collide."""
    names = [r.label for r in runs]
    for run, path in zip(runs, paths):
        if names.count(run.label) > 1:
            run.label = path


# --- table and plot ------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_table(runs: Sequence[RunMetrics], metrics: Sequence[str]) -> str:
    """One row per (metric, run): steps logged, step range, final, min and mean."""
    header = ["metric", "run", "steps", "last step", "final", "min", "mean"]
    rows = []
    for metric in metrics:
        for run in runs:
            s = run.series.get(metric)
            if s is None or not s.values:
                rows.append([metric, run.label, "0", "-", "missing", "-", "-"])
                continue
            finite = [v for v in s.values if math.isfinite(v)] or s.values
            rows.append(
                [metric, run.label, str(len(s.steps)), str(s.steps[-1]), _fmt(s.values[-1]), _fmt(min(finite)),
                 _fmt(math.fsum(finite) / len(finite))]
            )  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def missing_messages(runs: Sequence[RunMetrics], metrics: Sequence[str]) -> list[str]:
    """A clear line for each requested metric a run lacks, with the closest names it has."""
    messages = []
    for metric in metrics:
        for run in runs:
            if metric in run.series:
                continue
            close = difflib.get_close_matches(metric, list(run.series), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(run.series)} metrics"
            messages.append(f"metric {metric!r} not found in run {run.label} ({run.source}){hint}")
    return messages


def plot(runs: Sequence[RunMetrics], metrics: Sequence[str], out: str | Path) -> Path:
    """One subplot per metric (stacked), one line per run; written as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no display backend is needed or touched

    fig = Figure(figsize=(8.0, 3.0 * len(metrics)), dpi=100)
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        drawn = 0
        for run in runs:
            s = run.series.get(metric)
            if s is not None and s.values:
                ax.plot(s.steps, s.values, label=run.label, linewidth=1.2, marker="." if len(s.steps) < 30 else None)
                drawn += 1
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged by any run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 2 bad arguments or nothing to compare)."""
    parser = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directory, W&B offline run directory or .wandb file"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names (default: %(default)s)"
    )
    parser.add_argument("--out", default="compare.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--source", choices=("auto", "jsonl", "wandb"), default="auto", help="what to read in RUN")
    args = parser.parse_args(argv)

    paths, seen = [], set()
    for path in args.runs:  # one run given twice (relative and absolute, a symlink) is listed once
        if (resolved := Path(path).resolve()) not in seen:
            seen.add(resolved)
            paths.append(path)
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path, args.source))
        except (RunNotFoundError, WandbLogError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    unique_labels(runs, paths)
    for message in missing_messages(runs, args.metrics):
        print(message, file=sys.stderr)
    present = [m for m in args.metrics if any(m in r.series for r in runs)]
    if not present:
        print(f"error: none of the metrics {args.metrics} was logged by any run; nothing to compare", file=sys.stderr)
        return 2
    print(format_table(runs, args.metrics))
    out = plot(runs, present, args.out)
    print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
