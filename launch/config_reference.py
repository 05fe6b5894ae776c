"""The reference of every Hydra key the training app accepts, generated as ``docs/config.md``.

    python -m launch.config_reference            # print it
    python -m launch.config_reference --write    # write docs/config.md (make docs)
    python -m launch.config_reference --check    # exit 1 when docs/config.md is not current

Everything comes from the sources the app itself reads: the keys, their types and their order from
the dataclasses of :mod:`launch.config`, each key's description from its comment there (the trailing
comment, or else the comment block directly above it), each group's description from its dataclass's
docstring, the defaults from the config Hydra composes without overrides, and the config groups and
their options from ``conf/`` (an option's description is its file's leading comment). A key or an
option without a description is an error that names it: describe it at its source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch import config as app_config

REPO = Path(__file__).resolve().parent.parent
CONF = app_config.CONF_DIR
DOC = REPO / "docs" / "config.md"
GLOBAL_GROUP = "experiment"  # the one group not in the defaults: added with +experiment=NAME


class ConfigReferenceError(ValueError):
    """A key or a config option has no description at its source; the message names it and where to add one."""


@dataclass(frozen=True)
class Key:
    """One leaf key of the config: its dotted name, type, default and description."""

    name: str
    type: str
    default: Any
    description: str


@dataclass(frozen=True)
class Option:
    """One option of a config group (a YAML file under ``conf/<group>/``)."""

    name: str
    description: str
    sets: list[str]  # the overrides it amounts to: "key=value", and "group=option" for the groups it selects


# ---------------------------------------------------------------- descriptions from the source


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without ``#``)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls``: its trailing comment, else the comment block directly above it."""
    lines, first = inspect.getsourcelines(cls)
    source = "".join(lines)
    comments = {first + n - 1: text for n, text in _comments(source).items()}
    code = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        line = first + node.lineno - 1
        text = comments.get(line, "")
        if not text:
            block, above = [], line - 1
            while above in comments and code[above - first].lstrip().startswith("#"):
                block.insert(0, comments[above])
                above -= 1
            text = " ".join(block)
        out[node.target.id] = text
    return out


def _docstring(cls: type) -> str:
    doc = inspect.getdoc(cls)
    if not doc or doc.startswith(f"{cls.__name__}("):  # the one dataclasses writes
        raise ConfigReferenceError(f"{cls.__name__} in launch/config.py has no docstring: describe its group there")
    return " ".join(doc.split()).replace("``", "`")  # reStructuredText literals as Markdown code


def _leading_comment(path: Path) -> str:
    """The comment lines a YAML file starts with, joined (Hydra's ``# @package`` line left out)."""
    block = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            block.append(text)
    return " ".join(t for t in block if t)


# ---------------------------------------------------------------- the schema and its keys


def sections() -> dict[str, type]:
    """Each node of :class:`~launch.config.AppConf` that is a dataclass (a group, or ``train``) -> that class."""
    hints = {f.name: getattr(app_config, f.type, None) for f in dataclasses.fields(app_config.AppConf)}
    return {name: cls for name, cls in hints.items() if dataclasses.is_dataclass(cls)}


def keys() -> list[Key]:
    """Every leaf key, in schema order, with the default the app runs with when nothing is overridden."""
    defaults = OmegaConf.to_container(app_config.compose(), resolve=False, throw_on_missing=False)
    nodes = sections()
    out = []
    top = field_descriptions(app_config.AppConf)
    for f in dataclasses.fields(app_config.AppConf):
        if f.name in nodes:
            cls = nodes[f.name]
            described = field_descriptions(cls)
            out += [
                Key(f"{f.name}.{g.name}", str(g.type), defaults[f.name][g.name], described[g.name])
                for g in dataclasses.fields(cls)
            ]
        else:
            out.append(Key(f.name, str(f.type), defaults[f.name], top[f.name]))
    missing = [k.name for k in out if not k.description]
    if missing:
        raise ConfigReferenceError(
            f"no description for {', '.join(missing)}: add a comment to the field in launch/config.py "
            "(trailing, or a block directly above it)"
        )
    return out


# ---------------------------------------------------------------- config groups and options


def _fmt(value: Any) -> str:
    """``value`` as it is written in an override or in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={_fmt(value)}"]


def default_options() -> dict[str, str]:
    """Group -> the option ``conf/config.yaml``'s defaults list selects."""
    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(item, dict):
            for group, option in item.items():
                if (CONF / group).is_dir():
                    out[group] = option
    return out


def options(group: str) -> list[Option]:
    """The options of ``conf/<group>/``, with what each sets."""
    out = []
    for path in sorted((CONF / group).glob("*.yaml")):
        description = _leading_comment(path)
        if not description:
            raise ConfigReferenceError(f"{path.relative_to(REPO)} has no leading comment: say there what the option is")
        body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        selects = []
        for item in body.pop("defaults", []):
            for target, choice in item.items():  # "override /moe@_global_.moe: hf" selects moe=hf
                selects.append(f"{target.split()[-1].lstrip('/').split('@')[0]}={choice}")
        prefix = "" if group == GLOBAL_GROUP else group
        out.append(Option(path.stem, description, selects + _flatten(prefix, body)))
    return out


def groups() -> list[str]:
    """The config groups: the schema's nodes that have a ``conf/`` folder, then ``experiment``."""
    return [name for name in sections() if (CONF / name).is_dir()] + [GLOBAL_GROUP]


# ---------------------------------------------------------------- the page


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of ``docs/config.md``."""
    nodes, chosen, all_keys = sections(), default_options(), keys()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m launch.config_reference --write` (`make docs`) from launch/config.py and",
        "     conf/: edit those, not this file. tests/test_config_reference.py fails when it is not current. -->",
        "",
        "Every key below is a Hydra override of the training app, and of the planner, which takes the same",
        "overrides: `python launch/train.py model=small moe.capacity_factor=1.0 train.steps=1000`.",
        "`python launch/train.py --cfg job` prints the composed config. Hydra checks each key and its type",
        "against the schema in `launch/config.py` as it composes; the app then checks every value",
        "(`launch.config.validate`) before any process group exists.",
        "",
        "## Config groups",
        "",
        "A group's option is selected with `group=option` (e.g. `model=small parallel=ep2`) and sets the",
        "keys listed beside it; keys given on the command line win over it. The defaults are those of",
        "`conf/config.yaml`. `experiment` has no default: `+experiment=NAME` adds one, and it may set keys",
        "of every group.",
        "",
    ]
    for group in groups():
        default = chosen.get(group)
        lines += [f"### `{group}`", ""]
        if group in nodes:
            lines += [_docstring(nodes[group]), ""]
        lines += [f"Default: `{default}`." if default else "No default: `+experiment=NAME`.", ""]
        for option in options(group):
            sets = ", ".join(f"`{s}`" for s in option.sets)
            lines.append(f"- `{option.name}`: {option.description}" + (f" Sets {sets}." if sets else ""))
        lines.append("")
    lines += [
        "## Keys",
        "",
        "Defaults are the values of the config composed without overrides (the groups' default options);",
        "`???` is a value that must be given.",
        "",
    ]
    for section in ["", *nodes]:
        rows = [k for k in all_keys if (k.name.split(".")[0] == section if section else "." not in k.name)]
        title = f"`{section}.*`" if section else "Top level"
        lines += [f"### {title}", ""]
        if section:
            lines += [_docstring(nodes[section]), ""]
        lines += ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for k in rows:
            lines.append(
                f"| `{_cell(k.name)}` | `{_cell(k.type)}` | `{_cell(_fmt(k.default))}` | {_cell(k.description)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, write it to ``docs/config.md`` (``--write``) or check that file (``--check``)."""
    parser = argparse.ArgumentParser(prog="python -m launch.config_reference", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC.relative_to(REPO)} is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(REPO)}")
    elif args.check:
        current = DOC.read_text() if DOC.exists() else None
        if current != text:
            what = "is missing" if current is None else "is not current"
            print(f"{DOC.relative_to(REPO)} {what}: run `make docs`", file=sys.stderr)
            return 1
        print(f"{DOC.relative_to(REPO)} is current")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
