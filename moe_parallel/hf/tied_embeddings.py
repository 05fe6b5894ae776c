"""``tie_word_embeddings`` as transformers (5.x) loads it when the checkpoint disagrees with config.json.

transformers ties the LM head to the embedding only when the checkpoint does not say otherwise: with
both ``model.embed_tokens.weight`` and ``lm_head.weight`` stored and equal, one tied tensor; stored
and different, two untied tensors (it warns that config.json is wrong); with only ``lm_head.weight``
stored, the embedding is that tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..models.decoder import DecoderConfig

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
log = logging.getLogger(__name__)


class Tensors(Protocol):
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def get(self, key: str) -> Tensor: ...
    def get_rows(self, key: str, index: int) -> Tensor: ...


class HeadAsEmbedding:
    """``tensors`` (tied embeddings, only ``lm_head.weight`` stored) with the embedding read from it."""

    def __init__(self, tensors: Tensors) -> None:
        self.path = tensors.path
        self._tensors = tensors
        self.shapes = {**tensors.shapes, EMBED_KEY: tensors.shapes[HEAD_KEY]}
        self.dtypes = {**tensors.dtypes, EMBED_KEY: tensors.dtypes[HEAD_KEY]}

    def get(self, key: str) -> Tensor:
        return self._tensors.get(HEAD_KEY if key == EMBED_KEY else key)

    def get_rows(self, key: str, index: int) -> Tensor:
        return self._tensors.get_rows(HEAD_KEY if key == EMBED_KEY else key, index)


def head_only(shapes: dict[str, tuple[int, ...]], tie_word_embeddings: bool) -> bool:
    """Whether a tied checkpoint stores its one matrix as ``lm_head.weight`` alone."""
    return tie_word_embeddings and HEAD_KEY in shapes and EMBED_KEY not in shapes


def untie_if_stored_apart(config: DecoderConfig, source: Tensors) -> DecoderConfig:
    """``config`` untied when config.json ties the embeddings but the checkpoint stores two different
    matrices (transformers loads both then); ``config`` itself otherwise."""
    if not config.tie_embeddings or not {EMBED_KEY, HEAD_KEY} <= set(source.shapes):
        return config
    if source.shapes[EMBED_KEY] == source.shapes[HEAD_KEY] and torch.equal(source.get(EMBED_KEY), source.get(HEAD_KEY)):
        return config
    log.warning(
        "%s: config.json has tie_word_embeddings=true but %s and %s differ: loaded untied, as transformers does "
        "(set tie_word_embeddings=false in config.json to silence this)",
        source.path,
        EMBED_KEY,
        HEAD_KEY,
    )
    return dataclasses.replace(config, tie_embeddings=False)
