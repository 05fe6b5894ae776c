"""Tiny Hugging Face models and tokenizers built offline, for the command-line and training tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

EOS = "<|endoftext|>"


def tiny_tokenizer(dest: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE (every text encodes, no unknown token) trained on a few stdlib files, saved as
    tokenizer.json + tokenizer_config.json the way transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = [(stdlib / name).read_text() for name in ("functools.py", "textwrap.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(dest))
    return dest


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight non-default (norm weights too), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def tiny_qwen3_moe(dest: Path, vocab_size: int, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random 2-layer Qwen3-MoE (4 experts, top-2) saved with transformers' save_pretrained."""
    import transformers

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    kw.update(overrides)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    randomize_(model)
    model.to(dtype).save_pretrained(str(dest))
    return dest


def tiny_qwen3_moe_with_tokenizer(dest: Path) -> Path:
    """The tiny Qwen3-MoE and its own tokenizer in one directory, as on the Hub."""
    tiny_tokenizer(dest)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return tiny_qwen3_moe(dest, vocab_size=vocab + 3)  # a little padding, as real models have
