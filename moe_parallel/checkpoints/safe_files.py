"""Files that hold only tensors and plain data, so that loading one never runs code from it.

``torch.load`` unpickles, and a pickle may name any importable callable (``os.system``) and call it
while it loads. Every file moe_parallel writes is therefore checked on its way out (:func:`to_plain`
refuses anything but the types below) and read back with ``weights_only=True``, torch's restricted
unpickler, which builds exactly these types and refuses every other global *before* calling
anything (:func:`load_plain`). A file that needs more is refused by name.

Plain data: ``dict`` (and ``OrderedDict``), ``list``, ``tuple``, ``set``, ``str``, ``int``,
``float``, ``complex``, ``bool``, ``None``, ``torch.Tensor``, ``torch.Size``, ``torch.dtype``,
``torch.device`` (bytes go in uint8 tensors). NumPy scalars and arrays are converted (to Python
numbers and tensors) on the way out, since RNG and data-loader states hold them.

``weights_only=True`` is only a boundary from torch 2.6 on (earlier releases had bypasses):
:func:`require_safe_torch` refuses older ones.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAFE_TORCH = (2, 6)

# Not bytes: an empty bytes object pickles as a call of builtins.bytes, which the restricted loader refuses.
_SCALARS = (str, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)


class UnsafeFileError(RuntimeError):
    """A file holds objects other than tensors and plain data: loading it could run code."""


def require_safe_torch(version: str = torch.__version__) -> None:
    """Raise :class:`UnsafeFileError` for a torch whose ``weights_only=True`` is not a safe boundary."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < SAFE_TORCH:
        raise UnsafeFileError(
            f"torch {version} cannot load checkpoints safely (its weights_only=True loader had bypasses before "
            f"{SAFE_TORCH[0]}.{SAFE_TORCH[1]}): install torch>={SAFE_TORCH[0]}.{SAFE_TORCH[1]}"
        )


def to_plain(obj: Any, where: str = "the object") -> Any:
    """``obj`` as tensors and plain data (NumPy values converted); anything else is a ``TypeError``
    naming its path inside ``obj`` (``where['key'][3]``) and its type."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where} is a {type(obj).__name__}, a tensor subclass: store a plain tensor")
        return obj.detach()
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where} is a NumPy array of {obj.dtype}: store numbers")
        # torch has no uint16/uint32 arithmetic on every build; int64 holds them exactly.
        values = obj.astype(np.int64) if obj.dtype.kind == "u" and obj.dtype.itemsize > 1 else obj
        return torch.from_numpy(np.ascontiguousarray(values).copy())
    if type(obj) in _SCALARS:
        return obj
    if type(obj) in (dict, collections.OrderedDict):
        out = {}
        for key, value in obj.items():
            if type(key) not in _SCALARS:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: use str or int keys")
            out[key] = to_plain(value, f"{where}[{key!r}]")
        return collections.OrderedDict(out) if type(obj) is collections.OrderedDict else out
    if type(obj) in (list, tuple, set):
        items = [to_plain(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return type(obj)(items)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold only tensors and plain "
        "data (dict, list, tuple, str, numbers, None), so that loading one never runs code; store its state "
        "as those"
    )


def load_plain(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data, never code.

    A file that holds anything else raises :class:`UnsafeFileError` naming the file and the globals it
    asks for; nothing from it has run. Other failures (a truncated or damaged file) propagate.
    ``mmap``: map tensors instead of reading them (torch's zip format; other files are read).
    """
    require_safe_torch()
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower() and "weights_only" not in str(err):
            raise
        raise UnsafeFileError(
            f"{path} holds objects other than tensors and plain data ({_unsafe_globals(path)}): loading it "
            "could run code, so it is refused"
        ) from None


def _unsafe_globals(path: str | os.PathLike) -> str:
    """The globals a pickle asks for beyond the plain types, for the message (never unpickled)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(Path(path))
    except Exception:  # not a zip archive, or damaged past its pickle: the loader's refusal stands
        names = []
    return "asks for " + ", ".join(sorted(names)[:6]) if names else "instructions outside tensors and plain data"
