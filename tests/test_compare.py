"""RunLogger (real W&B offline runs, read back from the .wandb files), resume, fallback, and launch.compare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from launch import compare
from launch.compare import iter_wandb_records, load_run, read_wandb_history, read_wandb_run_info, wandb_files
from launch.expert_load_plots import expert_load_histogram
from launch.wandb_logger import NullRunLogger, RunLogger, RunLoggerConfigError, WandbSettings, make_run_logger
from moe_parallel import MoEConfig, MoELayer
from moe_parallel.training.metrics import MoEMetricsTracker, split_expert_load

wandb = pytest.importorskip("wandb")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class LoggedRun:
    path: Path
    run_id: str = ""
    logged: dict[str, dict[int, float]] = field(default_factory=dict)  # what the last job logged, per metric

    def note(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.logged.setdefault(key, {})[step] = float(value)


def settings(**overrides) -> WandbSettings:
    values = dict(project="moe-tests", group="exp-compare", tags=["test"], heatmap_every=4, heatmap_window=8)
    values.update(overrides)
    return WandbSettings(**values)


def synthetic_step(step: int, shift: float = 0.0) -> tuple[dict, dict]:
    scalars = {
        "train/loss": 4.0 / (step + 1) + shift,
        "train/lr": 1e-3,
        "moe/layer_1/balance_loss": 1.0 + 0.01 * step + shift,
        "moe/balance_loss": 1.0 + 0.01 * step + shift,
    }
    if step % 4 == 3:
        scalars["eval/loss"] = 4.5 / (step + 1)
    loads = {1: np.arange(8) + step, 3: np.full(8, 10)}
    return scalars, loads


def real_training_run(path: Path) -> LoggedRun:
    """Run B: a tiny MoE model trained for 16 steps, its metrics from the tracker."""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=0)
    model = nn.Sequential(MoELayer(cfg, layer_number=1), nn.Linear(8, 8), MoELayer(cfg, layer_number=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = MoEMetricsTracker(model)
    run = LoggedRun(path)
    logger = RunLogger(path, settings(name="real"), config={"model": {"experts": 4}, "lr": 0.1})
    g = torch.Generator().manual_seed(1)
    for step in range(16):
        loss = torch.zeros(())
        for _ in range(2):  # micro-batches
            x = torch.randn(6, 8, generator=g)
            micro = (model(x) - x).square().mean()
            (micro / 2).backward()
            loss += micro.detach() / 2
        opt.step()
        opt.zero_grad()
        scalars, loads = split_expert_load(tracker.reduce())
        scalars["train/loss"] = float(loss)
        logger.log(step, scalars, loads)
        run.note(step, scalars)
    logger.summary({"train/final_loss": float(loss)})
    run.run_id = logger.run_id or ""
    logger.finish()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, LoggedRun]:
    """Run A (two jobs: steps 0-11, then resumed from a step-8 checkpoint for steps 8-15) and run B."""
    root = tmp_path_factory.mktemp("runs")
    a = LoggedRun(root / "run_a")
    started = time.monotonic()
    logger = RunLogger(a.path, settings(name="a"), config={"lr": 1e-3, "note": "x" * 40_000})  # a >32 KiB record
    a.run_id = logger.run_id or ""
    for step in range(12):
        scalars, loads = synthetic_step(step)
        logger.log(step, scalars, loads)
    logger.finish()
    time.sleep(max(0.0, 1.1 - (time.monotonic() - started)))  # W&B names run directories by the second
    resumed = RunLogger(a.path, settings(name="a"), config={"lr": 1e-3}, resume_id=a.run_id)
    assert resumed.run_id == a.run_id
    for step in range(8, 16):
        scalars, loads = synthetic_step(step, shift=0.5)
        resumed.log(step, scalars, loads)
    resumed.summary({"eval/best_loss": 0.25})
    resumed.finish()
    for step in range(16):
        a.note(step, synthetic_step(step, shift=0.5 if step >= 8 else 0.0)[0])
    b = real_training_run(root / "run_b")
    yield {"a": a, "b": b}
    wandb.teardown()


# ---------------------------------------------------------------- RunLogger


def test_offline_run_files_read_back(runs):
    b = runs["b"]
    (file,) = wandb_files(b.path)
    assert file.parent.name.startswith("offline-run-") and file.parent.parent == b.path / "wandb"
    info = read_wandb_run_info(file)
    assert info["run_id"] == b.run_id and info["project"] == "moe-tests" and info["group"] == "exp-compare"
    assert info["display_name"] == "real" and info["tags"] == ["test"]

    history = {row["_step"]: row for row in read_wandb_history(file)}
    assert sorted(history) == list(range(16))
    for key in ("moe/layer_1/balance_loss", "moe/layer_3/balance_loss", "moe/balance_loss", "train/loss"):
        assert {s: history[s][key] for s in history} == pytest.approx(b.logged[key], rel=1e-12), key
    assert b.logged["moe/layer_3/balance_loss"][0] != b.logged["moe/layer_3/balance_loss"][15]  # it trained
    # compare sees the same scalar metrics in both sources (W&B's media fields are not metrics).
    assert sorted(load_run(b.path, "wandb").series) == sorted(load_run(b.path, "jsonl").series)
    # The expert load went in as a histogram with one bin per expert, and as heatmap images.
    row = history[5]
    assert row["moe/layer_1/expert_load._type"] == "histogram"
    assert row["moe/layer_1/expert_load.bins"] == [0, 1, 2, 3, 4]
    assert sum(row["moe/layer_1/expert_load.values"]) == 2 * 6 * 2  # micro-batches * tokens * top-k
    images = [s for s, r in history.items() if r.get("moe/layer_3/load_heatmap._type") == "image-file"]
    assert images == [3, 7, 11, 15]  # heatmap_every=4
    media = file.parent / "files" / history[3]["moe/layer_3/load_heatmap.path"]
    assert media.read_bytes().startswith(PNG_SIGNATURE)

    # The local mirror: one object per log call, same keys, loads as lists.
    lines = [json.loads(x) for x in (b.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(16))
    assert lines[4]["moe/layer_1/balance_loss"] == pytest.approx(b.logged["moe/layer_1/balance_loss"][4])
    assert len(lines[4]["moe/layer_3/tokens_per_expert"]) == 4
    assert (b.path / "expert_load" / "layer_3.png").read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((b.path / "summary.json").read_text())["train/final_loss"] == pytest.approx(
        b.logged["train/loss"][15]
    )


def test_config_and_multi_chunk_records(runs):
    first = wandb_files(runs["a"].path)[0]
    (run_record,) = [r.run for r in iter_wandb_records(first) if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["lr"] == 1e-3
    assert config["note"] == "x" * 40_000  # the record spans two 32 KiB blocks: FIRST + LAST chunks


def test_resume_continues_the_same_run(runs):
    a = runs["a"]
    files = wandb_files(a.path)
    assert len(files) == 2 and all(f.name == f"run-{a.run_id}.wandb" for f in files)  # one per job, same id
    first, second = (read_wandb_history(f) for f in files)
    assert [r["_step"] for r in first] == list(range(12)) and [r["_step"] for r in second] == list(range(8, 16))
    assert read_wandb_run_info(files[1])["run_id"] == a.run_id

    lines = [json.loads(x) for x in (a.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(12)) + list(range(8, 16))  # appended
    # Read back as one run: the resumed job's values replace the re-logged steps, from both sources.
    for source in ("wandb", "jsonl"):
        series = load_run(a.path, source).series["moe/layer_1/balance_loss"]
        assert series.steps == list(range(16)), source
        assert dict(zip(series.steps, series.values)) == pytest.approx(a.logged["moe/layer_1/balance_loss"])
    assert json.loads((a.path / "summary.json").read_text()) == {"eval/best_loss": 0.25}


def test_reader_agrees_with_wandb_core(runs):
    """Our reader against wandb's own (the Go wandb-core's `wandb leet inspect --json`), where it exists."""
    file = wandb_files(runs["a"].path)[0]
    cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(cli), "leet", "inspect", "--json", str(file)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip(f"this wandb has no `leet inspect --json`: {proc.stderr[-200:]}")
    core = [json.loads(line) for line in proc.stdout.splitlines()]
    ours = list(iter_wandb_records(file))
    assert [r["type"] for r in core] == [r.WhichOneof("record_type") for r in ours]
    core_history = [r["history"]["item"] for r in core if r["type"] == "history"]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in core_history] == [
        {k: v for k, v in row.items() if not k.startswith("_")} for row in read_wandb_history(file)
    ]


def test_damaged_tail_keeps_what_was_written(runs, tmp_path):
    file = wandb_files(runs["b"].path)[0]
    cut = tmp_path / file.name
    data = file.read_bytes()
    full = read_wandb_history(file)
    # A cut that happens to fall on a record's end (or in a block's zero padding) leaves an intact,
    # shorter log: nothing to warn about. Of cuts 3 and more bytes apart at least one falls inside a
    # record (a record header alone is 7 bytes), and every cut keeps what was written before it.
    warned = 0
    for offset in (0, 3, 8, 16):
        cut.write_bytes(data[: len(data) * 2 // 3 + offset])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = read_wandb_history(cut)
        warned += any("stopped reading" in str(w.message) for w in caught)
        assert 0 < len(rows) <= 16 and rows == full[: len(rows)]
    assert warned
    with pytest.raises(compare.WandbLogError, match="not a W&B transaction log"):
        list(iter_wandb_records(runs["b"].path / "metrics.jsonl"))


def test_wandb_failure_falls_back_to_jsonl(tmp_path, monkeypatch, caplog):
    # A setting W&B itself rejects: the run goes on without W&B.
    with pytest.warns(RuntimeWarning, match="W&B could not start"):
        logger = RunLogger(tmp_path / "bad_settings", settings(init_kwargs={"settings": {"no_such_setting": 1}}))
    assert not logger.wandb_active and logger.run_id
    logger.log(0, {"train/loss": 1.0}, {1: [1, 2]})
    logger.finish()
    assert json.loads((tmp_path / "bad_settings" / "metrics.jsonl").read_text())["train/loss"] == 1.0

    # W&B's init raising anything (a service that cannot start, no disk...): same, with the id kept.
    def boom(*args, **kwargs):
        raise OSError("wandb-core failed to start")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="wandb-core failed to start"):
        logger = RunLogger(tmp_path / "boom", settings(heatmap_every=1), resume_id="keepme1")
    assert logger.run_id == "keepme1" and "continuing with the local log" in caplog.text
    logger.log(3, {"train/loss": 2.0}, {1: np.array([5, 0, 1])})
    logger.summary({"eval/loss": 1.0})
    logger.finish()
    logger.finish()  # idempotent
    assert json.loads((tmp_path / "boom" / "metrics.jsonl").read_text())["moe/layer_1/tokens_per_expert"] == [5, 0, 1]
    assert (tmp_path / "boom" / "expert_load" / "layer_1.png").exists()


def test_disabled_mode_rank_gating_and_bad_settings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger = make_run_logger(tmp_path / "off", {"mode": "disabled", "tags": "a,b"}, rank=0)
    assert isinstance(logger, RunLogger) and not logger.wandb_active and len(logger.run_id) == 8
    logger.log(0, {"train/loss": torch.tensor(1.5)})
    logger.finish()
    assert not (tmp_path / "off" / "wandb").exists()
    assert json.loads((tmp_path / "off" / "metrics.jsonl").read_text()) == {"step": 0, "train/loss": 1.5}

    other = make_run_logger(tmp_path / "rank1", {"mode": "offline"}, rank=1)
    assert type(other) is NullRunLogger and other.run_id is None
    other.log(0, {"train/loss": 1.0}, {1: [1]})
    other.summary({})
    other.finish()
    assert not (tmp_path / "rank1").exists()

    with pytest.raises(RunLoggerConfigError, match="logger.mode='offlin'"):
        make_run_logger(tmp_path / "x", {"mode": "offlin"}, rank=1)  # refused on every rank
    with pytest.raises(RunLoggerConfigError, match="unknown logging setting"):
        WandbSettings.from_mapping({"projekt": "p"})


def test_histogram_bins_for_many_experts():
    counts, edges = expert_load_histogram(np.arange(4))
    assert counts.tolist() == [0, 1, 2, 3] and edges.tolist() == [0, 1, 2, 3, 4]
    counts, edges = expert_load_histogram(np.ones(1000))
    assert len(counts) <= 512 and counts.sum() == 1000 and edges[-1] == 1000 and len(edges) == len(counts) + 1


# ---------------------------------------------------------------- launch.compare


def test_compare_table_and_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp" / "compare.png"
    argv = [str(runs["a"].path), str(runs["b"].path), "--metrics", "train/loss", "moe/layer_1/balance_loss"]
    assert compare.main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "run", "steps", "last", "step", "final", "min", "mean"]
    row = next(x.split() for x in lines if x.startswith("moe/layer_1/balance_loss") and " run_a " in x)
    assert row[2:4] == ["16", "15"] and float(row[4]) == pytest.approx(runs["a"].logged["moe/layer_1/balance_loss"][15])
    assert float(row[5]) == pytest.approx(1.0)
    row_b = next(x.split() for x in lines if x.startswith("train/loss") and " run_b " in x)
    assert float(row_b[4]) == pytest.approx(runs["b"].logged["train/loss"][15], rel=1e-3)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

    # The same comparison from the .wandb files.
    assert compare.main([*argv, "--out", str(tmp_path / "w.png"), "--source", "wandb"]) == 0
    from_wandb = capsys.readouterr().out
    assert from_wandb.split("\n\nplot:")[0] == table.split("\n\nplot:")[0]


def test_compare_missing_metrics(runs, tmp_path, capsys):
    a, b = str(runs["a"].path), str(runs["b"].path)
    assert compare.main([a, b, "--metrics", "train/loss", "eval/loss", "--out", str(tmp_path / "p.png")]) == 0
    captured = capsys.readouterr()
    assert "metric 'eval/loss' not found in run run_b" in captured.err
    assert any(x.startswith("eval/loss") and "missing" in x for x in captured.out.splitlines())

    assert compare.main([a, b, "--metrics", "train/los", "--out", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert "did you mean train/loss" in err and "nothing to compare" in err
    assert not (tmp_path / "q.png").exists()

    assert compare.main([a, str(tmp_path / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare.main([a, str(empty)]) == 2
    assert "found no metrics.jsonl or wandb/offline-run-*/run-*.wandb" in capsys.readouterr().err


def test_compare_cli_module(runs, tmp_path):
    """``python -m launch.compare`` as a user runs it, on copies named alike (labels stay distinct)."""
    x, y = tmp_path / "x" / "run", tmp_path / "y" / "run"
    shutil.copytree(runs["a"].path, x)
    shutil.copytree(runs["b"].path, y)
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.compare", str(x), str(y), "--out", str(out)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(x) in proc.stdout and str(y) in proc.stdout and "moe/balance_loss" in proc.stdout
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_compare_lists_a_run_once_whatever_its_spelling(runs, tmp_path, capsys, monkeypatch):
    """Relative, absolute, with `..` and through a symlink: one run, one row per metric."""
    a = runs["a"].path
    monkeypatch.chdir(a.parent)
    link = tmp_path / "link"
    link.symlink_to(a)
    spellings = [a.name, str(a), f"../{a.parent.name}/{a.name}", str(link)]
    assert compare.main([*spellings, "--metrics", "train/loss", "--out", str(tmp_path / "d.png")]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train/loss")]
    assert len(rows) == 1, rows
