"""What both Hugging Face conversions (``import-hf``, ``export-hf``; :mod:`launch.hf_convert`) and a
``model=hf`` run share: the model's identity beside a checkpoint, the dtype each tensor is stored
in, and the checks made on an output before anything is written.

A converted or trained checkpoint directory holds, beside ``latest`` and its tags, ``hf_model/``
(:data:`HF_MODEL_DIR`): the model's identity as a Hugging Face config (config.json of its family
and the tokenizer files), so ``export-hf`` works from any run's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_parallel import hf
from moe_parallel.checkpoints import resumable
from moe_parallel.core.layer import MoELayer
from moe_parallel.hf.families import Family, read_config_json
from moe_parallel.hf.save import TOKENIZER_FILES
from moe_parallel.models.decoder import Decoder, DecoderConfig

HF_MODEL_DIR = "hf_model"  # beside `latest` in a checkpoint directory
QUANTIZED_SOURCE_FILE = "quantized_source.json"  # in hf_model/: the imported weights were dequantized
TRAINING_FILE = "moe_parallel.json"  # in hf_model/: how the run trained (whether it trained the routers' bias)


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


def find_hf_model_dir(checkpoint: Path, root: Path) -> Path | None:
    """``hf_model/`` beside ``latest`` (the directory given, or the parent of a tag directory)."""
    for folder in (root, checkpoint.parent, checkpoint):
        if (folder / HF_MODEL_DIR / "config.json").is_file():
            return folder / HF_MODEL_DIR
    return None


# ---------------------------------------------------------------- what both directions write


def stored_dtype(keys: list[str], fam: Family, source_dtype: torch.dtype, asked: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: float32 for what the family keeps in float32 (GLM's router and
    correction bias), else the one asked, else the source's."""
    if keys and all(fam.keeps_fp32(key) for key in keys):
        return torch.float32
    return asked or source_dtype


def require_disk_space(out: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, an output that does not fit on ``out``'s file system."""
    free = resumable.free_bytes(out.parent)
    if needed > free:
        raise ConversionError(
            f"--out {out}: {what} needs {needed:,} more bytes ({needed / 2**30:.2f} GiB, with a margin) on its file "
            f"system, which has {free:,} bytes ({free / 2**30:.2f} GiB) free: free space there, or choose an --out "
            "on another file system"
        )


def space_margin(total: int) -> int:
    """Room beyond the estimate: file-system blocks and metadata, the files' own headers."""
    return max(total // 100, 16 << 20)


def small_files_bytes(folder: Path | None) -> int:
    """Bytes of the config and tokenizer files an output copies (a fraction of a model, but counted)."""
    if folder is None:
        return 0
    return sum(
        (folder / name).stat().st_size for name in (*TOKENIZER_FILES, "config.json") if (folder / name).is_file()
    )


def require_new_or_empty(out: Path, what: str) -> None:
    """Refuse an ``--out`` that exists and is not an empty directory: a conversion never overwrites."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = sorted(p.name for p in out.iterdir())[:4] if out.is_dir() else "a file"
        raise ConversionError(f"--out {out} already holds {held}: choose a new or empty directory for {what}")
