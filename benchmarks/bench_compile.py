"""Training-step time with compiled transformer blocks (``train.compile=true``) against eager ones.

Two copies of one model with the same weights: one eager, one with every block compiled in place by
``moe_parallel.training.block_compile.compile_blocks`` (``torch.compile``'s default backend, inductor, unless
``--backend`` says otherwise; the embeddings, LM head and loss stay eager, as in training). A step is
forward, cross-entropy loss, backward and an AdamW update. Each round times one step of each copy on
the same batch, in alternating order, so that background load hits both alike; the ratio
compiled / eager is taken per round and its median reported (below 1: compiling pays). Compile time
(the warm-up steps of the compiled copy) is reported apart.

Models:

- ``gpt-tiny``: the reference GPT of ``conf/model/tiny.yaml`` with ``conf/moe/default.yaml`` (4 blocks,
  D=128, F=512, MoE every second block, 8 experts top-2, capacity factor 1.25);
- ``gpt-tiny-dense``: the same without MoE blocks (what compiling attention, norms and dense FFNs gives);
- ``gpt-small``: ``conf/model/small.yaml`` (8 blocks, D=512, F=2048, SwiGLU);
- ``mixtral-tiny``: a Mixtral-shaped decoder built from a transformers ``MixtralConfig`` through
  ``decoder_config_from_hf`` (4 blocks, D=128, 4 heads over 2 KV heads, 8 experts top-2 of F=256,
  dropless: every block MoE).

    .venv/bin/python benchmarks/bench_compile.py                          # gpt-tiny and mixtral-tiny
    .venv/bin/python benchmarks/bench_compile.py --models gpt-small --rounds 9 --batch 4
    .venv/bin/python benchmarks/bench_compile.py --backend aot_eager      # tracing overhead only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness.report import cpu_model  # noqa: E402
from moe_parallel.models import GPT, Decoder, GPTConfig, lm_loss  # noqa: E402
from moe_parallel.training.block_compile import compile_blocks  # noqa: E402

GPT_MOE = dict(num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
               drop_policy="probs", aux_loss_coeff=0.01, z_loss_coeff=0.001)  # fmt: skip


@dataclass(frozen=True)
class Bench:
    name: str
    vocab_size: int
    build: Callable[[int, int], nn.Module]  # (vocab size, seq len) -> model

    def describe(self, model: nn.Module) -> str:
        cfg = model.config
        moe = cfg.moe
        experts = f"{moe.num_experts} experts top-{moe.top_k}, cf {moe.capacity_factor}" if moe else "dense"
        return (
            f"{cfg.num_layers} blocks ({len(cfg.moe_layer_numbers)} MoE), D={cfg.hidden_size}, "
            f"F={cfg.ffn_hidden_size}, {experts}"
        )


def gpt(
    num_layers: int, hidden: int, heads: int, ffn: int, activation: str, moe_every: int = 2
) -> Callable[[int, int], nn.Module]:
    def build(vocab: int, seq: int) -> nn.Module:
        config = GPTConfig(
            vocab_size=vocab, seq_len=seq, num_layers=num_layers, hidden_size=hidden, num_heads=heads,
            ffn_hidden_size=ffn, moe_every=moe_every, moe=dict(GPT_MOE) if moe_every else None,
            activation=activation, tie_embeddings=True,
        )  # fmt: skip
        return GPT(config)

    return build


def mixtral_tiny(vocab: int, seq: int) -> nn.Module:
    import transformers

    from moe_parallel.hf.families import decoder_config_from_hf

    hf = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=seq,
        tie_word_embeddings=False, router_aux_loss_coef=0.01,
    )  # fmt: skip
    return Decoder(decoder_config_from_hf(hf))


BENCHES = {
    b.name: b
    for b in (
        Bench("gpt-tiny", 2048, gpt(4, 128, 4, 512, "gelu")),
        Bench("gpt-tiny-dense", 2048, gpt(4, 128, 4, 512, "gelu", moe_every=0)),
        Bench("gpt-small", 2048, gpt(8, 512, 8, 2048, "swiglu")),
        Bench("mixtral-tiny", 2048, mixtral_tiny),
    )
}


def make_step(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
        loss = lm_loss(model(tokens_BS), targets_BS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def run(bench: Bench, args: argparse.Namespace) -> dict[str, float | str]:
    torch.manual_seed(0)
    eager = bench.build(bench.vocab_size, args.seq).train()
    compiled = bench.build(bench.vocab_size, args.seq).train()
    compiled.load_state_dict(eager.state_dict())
    blocks = compile_blocks(compiled, backend=args.backend)
    eager_step, compiled_step = make_step(eager), make_step(compiled)
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, bench.vocab_size, (args.batch, args.seq + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    compile_s = sum(compiled_step(*batch()) for _ in range(args.warmup))  # compiles, then warm
    for _ in range(args.warmup):
        eager_step(*batch())
    eager_ms, compiled_ms, ratios = [], [], []
    for round_ in range(args.rounds):
        data = batch()
        order = (eager_step, compiled_step) if round_ % 2 == 0 else (compiled_step, eager_step)
        times = {fn: fn(*data) for fn in order}
        eager_ms.append(1e3 * times[eager_step])
        compiled_ms.append(1e3 * times[compiled_step])
        ratios.append(times[compiled_step] / times[eager_step])
    ratios.sort()
    quartile = max(1, len(ratios) // 4)
    return {
        "model": bench.name,
        "shape": bench.describe(eager),
        "blocks": len(blocks),
        "eager_ms": statistics.median(eager_ms),
        "compiled_ms": statistics.median(compiled_ms),
        "ratio": statistics.median(ratios),
        "ratio_q1": ratios[quartile - 1],
        "ratio_q3": ratios[-quartile],
        "compile_s": compile_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt-tiny,mixtral-tiny", help=f"comma-separated, of {sorted(BENCHES)}")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8, as train.micro_batch_size)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128, as data.seq_len)")
    parser.add_argument("--rounds", type=int, default=15, help="timed paired rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each copy first (default 3)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(BENCHES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose among {sorted(BENCHES)}")
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be >= 1 (the first compiled step compiles)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {cpu_model()}, {torch.get_num_threads()} "
        f"threads; fp32, batch {args.batch} x seq {args.seq}, backend {args.backend}, {args.rounds} paired rounds "
        f"after {args.warmup} warm-up steps\n"
    )
    print("| model | shape | eager ms | compiled ms | compiled / eager (median, IQR) | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        r = run(BENCHES[name], args)
        print(
            f"| {r['model']} | {r['shape']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{r['ratio']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | {r['compile_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
