"""docs/config.md: current with the schema and conf/, and naming every key and option the app accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from launch import config as app_config
from launch import config_reference as ref

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted names of the schema's leaves; a free-form dict field (``deepspeed.extra``) is one leaf."""
    out = []
    for name in node.keys():
        key = f"{prefix}{name}"
        child = node._get_node(name)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            out += leaf_keys(child, f"{key}.")
        else:
            out.append(key)
    return out


def option_overrides() -> list[list[str]]:
    conf = ref.CONF
    overrides = [[]]
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir()):
        plus = "+" if group == ref.GLOBAL_GROUP else ""
        overrides += [[f"{plus}{group}={path.stem}"] for path in sorted((conf / group).glob("*.yaml"))]
    return overrides


def test_doc_is_current():
    assert DOC.exists(), "docs/config.md is missing: run `make docs`"
    assert DOC.read_text() == ref.render(), "docs/config.md is not current: run `make docs`"


def test_check_flag_reports_a_stale_doc(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(ref.render().replace("| `moe.top_k` |", "| `moe.topk` |"))
    monkeypatch.setattr(ref, "DOC", stale)
    monkeypatch.setattr(ref, "REPO", tmp_path)
    assert ref.main(["--check"]) == 1
    assert "config.md is not current: run `make docs`" in capsys.readouterr().err
    assert ref.main(["--write"]) == 0 and ref.main(["--check"]) == 0


@pytest.mark.parametrize("overrides", option_overrides(), ids=lambda o: o[0] if o else "defaults")
def test_every_key_is_documented(overrides):
    doc = DOC.read_text()
    cfg = app_config.compose(*overrides)
    keys = leaf_keys(cfg)
    assert "moe.top_k" in keys and "deepspeed.extra" in keys and "experiment" in keys
    undocumented = [k for k in keys if f"| `{k}` |" not in doc]
    assert not undocumented, f"docs/config.md lacks {undocumented}: run `make docs`"


def test_every_group_option_is_documented():
    doc = DOC.read_text()
    for group in [p.name for p in ref.CONF.iterdir() if p.is_dir()]:
        section = re.search(rf"^### `{group}`\n(.*?)(?=^#)", doc, re.S | re.M)
        assert section, f"docs/config.md has no section for the config group {group}"
        for path in (ref.CONF / group).glob("*.yaml"):
            assert f"- `{path.stem}`: " in section.group(1), f"{group}={path.stem} is not in docs/config.md"


def test_a_key_without_a_description_is_refused(monkeypatch):
    described = ref.field_descriptions

    def without_one(cls):
        out = described(cls)
        return {**out, "top_k": ""} if "top_k" in out else out

    monkeypatch.setattr(ref, "field_descriptions", without_one)
    with pytest.raises(ref.ConfigReferenceError, match=r"moe\.top_k: add a comment"):
        ref.keys()


def test_descriptions_come_from_trailing_comments_or_the_block_above():
    described = ref.field_descriptions(ref.app_config.TrainConf)
    assert described["steps"] == "optimizer steps of the whole run"
    assert described["max_skipped_steps"].startswith("Divergence guard: stop (exit 65)")
    assert described["collapse_min_entropy"] == "degenerate: router entropy (nats) below this"
