"""Run logging for the trainer: Weights & Biases (offline by default) plus a local JSONL mirror.

Only global rank 0 logs; :func:`make_run_logger` gives every other rank a :class:`NullRunLogger`
with the same methods. W&B never stops training: when it cannot start (not installed, bad
settings, a failing service), a warning is logged and the run goes on with the JSONL mirror only::

    logger = make_run_logger(run_dir, WandbSettings(group="moe-64e"), config=cfg_dict,
                             resume_id=checkpoint.get("wandb_run_id"))
    logger.log(step, {"train/loss": 2.31, "train/lr": 3e-4}, expert_load={3: counts_E})
    checkpoint["wandb_run_id"] = logger.run_id
    logger.summary({"eval/best_ppl": 9.8}); logger.finish()

Files, under the run directory:

    metrics.jsonl                one JSON object per log call: {"step": s, key: value, ...}; expert loads
                                 as lists under moe/layer_{n}/tokens_per_expert; appended on resume
    summary.json                 the summary metrics (merged over resumes)
    expert_load/layer_{n}.png    the latest load heatmap of each layer
    wandb/offline-run-*/         W&B's own files (mode offline); ``wandb sync`` uploads them

Key names line up in W&B's run comparison: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``eval/loss``, ``eval/ppl``, ``moe/layer_{n}/...`` (see ``metrics.py``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from launch.expert_load_plots import expert_load_histogram, render_load_heatmap
from launch.wandb_service import start_service_outside_process_tree, wait_until_complete

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


class RunLoggerConfigError(ValueError):
    """A run-logging setting is invalid; the message names the field and the fix."""


@dataclass
class WandbSettings:
    """How a run is logged (the ``logger`` config group).

    Attributes:
        mode: ``offline`` (default: files only, no network, no API key), ``online`` or ``disabled``
            (no W&B at all; the JSONL mirror is still written).
        project: W&B project.
        entity: W&B entity (team or user); None = the default one.
        group: experiment name; W&B groups the runs of one experiment (e.g. a sweep's seeds) under it.
        name: display name of this run; None = W&B's generated one.
        tags: W&B tags.
        heatmap_every: log each layer's expert-load heatmap every this many ``log`` calls that carry
            expert loads (0 = never).
        heatmap_window: rows (steps) kept in the rolling heatmap of each layer.
        init_timeout: seconds W&B may take to start before the run goes on without it.
        init_kwargs: further keyword arguments for ``wandb.init`` (e.g. ``notes``, ``settings``).
    """

    mode: str = "offline"
    project: str = "moe_parallel"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    heatmap_every: int = 100
    heatmap_window: int = 500
    init_timeout: float = 90.0
    init_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):  # logger.tags=a,b on the command line
            self.tags = [t.strip() for t in self.tags.split(",") if t.strip()]
        self.tags = [str(t) for t in self.tags or []]
        self.init_kwargs = dict(self.init_kwargs or {})
        if self.mode not in WANDB_MODES:
            raise RunLoggerConfigError(f"logger.mode={self.mode!r} must be one of {', '.join(WANDB_MODES)}")
        for name in ("heatmap_every", "heatmap_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "heatmap_every" else 1):
                raise RunLoggerConfigError(
                    f"logger.{name}={value!r} must be an integer >= {int(name != 'heatmap_every')}"
                )
        if not self.init_timeout > 0:
            raise RunLoggerConfigError(f"logger.init_timeout={self.init_timeout!r} must be > 0 seconds")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> WandbSettings:
        """Build from a dict (e.g. Hydra's ``cfg.logging``); an unknown key is an error naming it."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RunLoggerConfigError(f"unknown logging setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _to_plain(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of ``config`` (OmegaConf containers resolved, dataclasses expanded)."""
    if config is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(config)
    return dict(config)


def _json_value(value: Any) -> Any:
    """Scalars as float/int/bool, arrays as lists (NaN and Inf kept as Python's json writes them)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return value.tolist()
    if isinstance(value, float):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return float(value)


def _new_run_id() -> str:
    """An id in W&B's alphabet and length, for runs without W&B (so a resume keeps one id)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class NullRunLogger:
    """What ranks other than 0 get: every method does nothing."""

    run_id: str | None = None
    wandb_active: bool = False

    def log(self, step: int, scalars: Mapping[str, Any], expert_load: Mapping[int, Any] | None = None) -> None:
        """Do nothing."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Do nothing."""

    def alert(self, step: int, title: str, text: str, data: Mapping[str, Any] | None = None) -> None:
        """Do nothing."""

    def finish(self) -> None:
        """Do nothing."""

    def __enter__(self) -> NullRunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


class RunLogger(NullRunLogger):
    """Logs one training run to W&B and to ``run_dir/metrics.jsonl``.

    Args:
        run_dir: the run's directory (created); W&B writes under ``run_dir/wandb``.
        settings: :class:`WandbSettings` (or a mapping of its fields).
        config: the full run configuration (dict, dataclass or OmegaConf), logged as the W&B config.
        resume_id: the ``run_id`` of the run to continue (stored in the checkpoint by the trainer):
            W&B is started with ``id=resume_id, resume="allow"`` and the JSONL mirror is appended to.

    ``run_id`` is W&B's run id, or a generated one when W&B is disabled or failed (so that a resumed
    job keeps one id either way). ``wandb_active`` tells whether W&B is receiving the metrics.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        settings: WandbSettings | Mapping[str, Any] | None = None,
        config: Any = None,
        resume_id: str | None = None,
    ) -> None:
        if not isinstance(settings, WandbSettings):
            settings = WandbSettings.from_mapping(settings)
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = _to_plain(config)
        self.run_id: str | None = resume_id
        self.wandb_active = False
        self._run: Any = None
        self._wandb: Any = None
        self._finished = False
        self._load_steps: dict[int, deque[int]] = {}
        self._load_rows: dict[int, deque[np.ndarray]] = {}
        self._load_logs = 0
        self._heatmaps_off = False
        self._jsonl = self._open_jsonl(self.run_dir / JSONL_NAME)
        if settings.mode != "disabled":
            self._start_wandb(resume_id)
        if self.run_id is None:
            self.run_id = _new_run_id()

    # -- setup ---------------------------------------------------------------------------------

    @staticmethod
    def _open_jsonl(path: Path) -> Any:
        """Open for appending, line-buffered; a line cut short by a crash is ended first."""
        needs_newline = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        handle = path.open("a", buffering=1, encoding="utf-8")
        if needs_newline:
            handle.write("\n")
        return handle

    def _start_wandb(self, resume_id: str | None) -> None:
        s = self.settings
        try:
            import wandb

            start_service_outside_process_tree()

            kwargs: dict[str, Any] = dict(
                project=s.project,
                entity=s.entity,
                group=s.group,
                name=s.name,
                tags=s.tags or None,
                config=self.config,
                dir=str(self.run_dir),
                mode=s.mode,
            )
            if resume_id:
                kwargs.update(id=resume_id, resume="allow")
            extra = dict(s.init_kwargs)
            user_settings = extra.pop("settings", None)
            settings = wandb.Settings(init_timeout=s.init_timeout, **dict(user_settings or {}))
            kwargs.update(extra)
            self._run = wandb.init(settings=settings, **kwargs)
            self._wandb = wandb
            self.run_id = self._run.id
            self.wandb_active = True
        except Exception as exc:  # nothing W&B does may stop training
            self._disable_wandb(f"could not start ({type(exc).__name__}: {exc})")

    def _disable_wandb(self, why: str) -> None:
        message = f"W&B {why}; continuing with the local log {self.run_dir / JSONL_NAME} only"
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        run, self._run, self.wandb_active = self._run, None, False
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    # -- logging -------------------------------------------------------------------------------

    def log(self, step: int, scalars: Mapping[str, Any], expert_load: Mapping[int, Any] | None = None) -> None:
        """Log one step: ``scalars`` (name -> number) and ``expert_load`` (layer number -> tokens per expert).

        Each expert-load vector goes to W&B as a histogram ``moe/layer_{n}/expert_load`` (bin ``i`` =
        expert ``i``, height = tokens), into the layer's rolling heatmap (an image
        ``moe/layer_{n}/load_heatmap`` every ``heatmap_every`` calls), and into the JSONL mirror as
        ``moe/layer_{n}/tokens_per_expert``.
        """
        if self._finished:
            raise RuntimeError("RunLogger.log() after finish()")
        step = int(step)
        record: dict[str, Any] = {"step": step}
        record.update({str(k): _json_value(v) for k, v in scalars.items()})
        loads = {
            int(n): np.asarray(_json_value(v), dtype=np.float64).reshape(-1) for n, v in (expert_load or {}).items()
        }
        for number, counts in loads.items():
            record[f"moe/layer_{number}/tokens_per_expert"] = [int(c) if c.is_integer() else c for c in counts.tolist()]
        self._jsonl.write(json.dumps(record) + "\n")

        heatmaps = self._update_heatmaps(step, loads)
        if self._run is None:
            return
        try:
            wandb = self._wandb
            data: dict[str, Any] = {k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}
            for number, counts in loads.items():
                data[f"moe/layer_{number}/expert_load"] = wandb.Histogram(np_histogram=expert_load_histogram(counts))
            for number, path in heatmaps.items():
                data[f"moe/layer_{number}/load_heatmap"] = wandb.Image(str(path))
            self._run.log(data, step=step)
        except Exception as exc:
            self._disable_wandb(f"failed to log step {step} ({type(exc).__name__}: {exc})")

    def _update_heatmaps(self, step: int, loads: Mapping[int, np.ndarray]) -> dict[int, Path]:
        """Append to the rolling [steps x experts] matrices; every ``heatmap_every`` calls, render them.

        Returns the PNGs written (``run_dir/expert_load/layer_{n}.png``, overwritten each time).
        """
        if not loads or self.settings.heatmap_every == 0 or self._heatmaps_off:
            return {}
        window = self.settings.heatmap_window
        for number, counts in loads.items():
            steps = self._load_steps.setdefault(number, deque(maxlen=window))
            rows = self._load_rows.setdefault(number, deque(maxlen=window))
            if rows and rows[-1].size != counts.size:  # the number of experts changed: start over
                steps.clear()
                rows.clear()
            steps.append(step)
            rows.append(counts)
        self._load_logs += 1
        if self._load_logs % self.settings.heatmap_every:
            return {}
        paths: dict[int, Path] = {}
        try:
            for number in loads:
                fig = render_load_heatmap(
                    list(self._load_steps[number]),
                    np.stack(self._load_rows[number]),
                    f"MoE layer {number}: expert load",
                )
                path = self.run_dir / "expert_load" / f"layer_{number}.png"
                path.parent.mkdir(exist_ok=True)
                fig.savefig(path, format="png")
                paths[number] = path
        except Exception as exc:  # e.g. matplotlib missing: heatmaps are optional, training goes on
            self._heatmaps_off = True
            log.warning("expert-load heatmaps disabled: %s: %s", type(exc).__name__, exc)
            return {}
        return paths

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary metrics (e.g. best eval loss) in W&B and in ``summary.json``."""
        plain = {str(k): _json_value(v) for k, v in values.items()}
        path = self.run_dir / SUMMARY_NAME
        merged: dict[str, Any] = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                merged = {}
        merged.update(plain)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
        if self._run is not None:
            try:
                self._run.summary.update(plain)
            except Exception as exc:
                self._disable_wandb(f"failed to set the summary ({type(exc).__name__}: {exc})")

    def alert(self, step: int, title: str, text: str, data: Mapping[str, Any] | None = None) -> None:
        """Record a warning that needs a human: a W&B alert (where W&B can send one; never fatal) and
        a JSONL record ``{"step", "alert": title, "alert/text": text, "alert/data": data}``."""
        record = {
            "step": int(step),
            "alert": title,
            "alert/text": text,
            "alert/data": {str(k): _json_value(v) for k, v in (data or {}).items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        if self._run is None:
            return
        try:
            self._run.alert(title=title, text=text, level=self._wandb.AlertLevel.WARN)
        except Exception as exc:  # offline runs and old versions may refuse: the JSONL record stands
            log.warning("W&B alert %r not sent (%s: %s); it is in %s", title, type(exc).__name__, exc, JSONL_NAME)

    def finish(self) -> None:
        """Flush and close the JSONL mirror and finish the W&B run (idempotent)."""
        if self._finished:
            return
        self._finished = True
        self._jsonl.close()
        run, self._run = self._run, None
        if run is not None:
            try:
                sync_file = Path(run.settings.sync_file)
                run.finish()
                wait_until_complete(sync_file)
            except Exception as exc:
                log.warning("W&B failed to finish the run: %s: %s", type(exc).__name__, exc)


def _default_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def make_run_logger(
    run_dir: str | os.PathLike[str],
    settings: WandbSettings | Mapping[str, Any] | None = None,
    config: Any = None,
    resume_id: str | None = None,
    rank: int | None = None,
) -> RunLogger | NullRunLogger:
    """A :class:`RunLogger` on global rank 0 (``rank`` default: torch.distributed's, else ``$RANK``), a no-op elsewhere.

    Settings are validated on every rank, so a bad value fails everywhere before training starts.
    """
    if not isinstance(settings, WandbSettings):
        settings = WandbSettings.from_mapping(settings)
    if (rank if rank is not None else _default_rank()) != 0:
        return NullRunLogger()
    return RunLogger(run_dir, settings, config=config, resume_id=resume_id)
