"""Hugging Face models at (PP, EP) = (1, 2) and (2, 2) on 4 gloo processes: the same logits as
transformers' forward, each rank reading only the tensors it holds, an export written by the ranks
of an expert-parallel group (each its own experts) that is bit-identical to the original, and
training steps of the pipeline under DeepSpeed that follow the plain model's losses."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moe_parallel import hf
from moe_parallel.checkpoints.checkpoint import export_consolidated, save_checkpoint
from moe_parallel.hf.load import build_and_load
from moe_parallel.integration.parallel import initialize_parallel
from moe_parallel.integration.pipeline import decoder_pipeline, decoder_pipeline_parts
from moe_parallel.models import lm_loss
from tests.dist_utils import run_distributed
from tests.hf_models import EAGER, FAMILIES, hf_tensors, random_hf_config, relative_error, save_hf_model, tokens

WORLD = 4


class CountingSource(hf.SafetensorsDir):
    """A safetensors directory that remembers which tensors were read: a per-expert key, or
    ``key#j`` for expert ``j``'s rows of a fused expert tensor (``key#*`` for all of them)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.read: set[str] = set()

    def get(self, key: str) -> torch.Tensor:
        self.read.add(f"{key}#*" if ".experts." in key and _expert_of(key) is None else key)
        return super().get(key)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        self.read.add(f"{key}#{index}")
        return super().get_rows(key, index)


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def _expert_of(key: str) -> int | str | None:
    if "#" in key:  # rows of a fused tensor
        row = key.rsplit("#", 1)[1]
        return row if row == "*" else int(row)
    parts = key.split(".")
    return int(parts[5]) if len(parts) > 5 and parts[4] == "experts" and parts[5].isdigit() else None


def _reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **EAGER).eval()


def _expert_parallel(rank: int, cases: list[tuple[str, str]], out_dir: str) -> None:
    state = initialize_parallel(pipeline_parallel_size=1, expert_parallel_size=2)
    for family, path in cases:
        path = Path(path)
        reference = _reference(path)
        source = CountingSource(path)
        config = hf.load_config(path)
        model = build_and_load(config, source, ep_group=state.ep_group).eval()
        if config.moe_layer_numbers:
            per_rank = config.moe.num_experts // 2
            mine = range(state.ep_rank * per_rank, (state.ep_rank + 1) * per_rank)
            read = {_expert_of(k) for k in source.read} - {None}
            assert read == set(mine), (family, rank, read, mine)  # its experts, all of them, nothing else
        x = tokens(config.vocab_size, seed=rank)  # every rank routes different tokens
        with torch.no_grad():
            err = relative_error(model(x), reference(x).logits)
        assert err <= 1e-5, (family, "EP=2", rank, err)

        export = Path(out_dir) / f"{family}_ep2"
        if rank < 2:  # the ranks of one expert-parallel group write, each its own experts
            hf.save_pretrained(model, export, max_shard_bytes=4096)
        dist.barrier()
        if rank == 0:
            original, exported = hf_tensors(path), hf_tensors(export)
            assert set(original) == set(exported), family
            for key, tensor in original.items():
                assert torch.equal(exported[key], tensor), (family, key)
            loaded, info = _load_with_info(export)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def _load_with_info(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **EAGER)


def _pipeline(rank: int, cases: list[tuple[str, str]]) -> None:
    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=2)
    topology = state.deepspeed_topology()
    stage, dp = state.stage_id, topology.get_coord(rank).data
    for family, path in cases:
        path = Path(path)
        reference = _reference(path)
        config = hf.load_config(path)
        module = decoder_pipeline(config, ep_group=state.ep_group, topology=topology).eval()
        source = CountingSource(path)
        hf.load_weights(module, source)
        parts = decoder_pipeline_parts(config, 2)
        my_blocks = set(range(parts[stage] - 1, parts[stage + 1] - 1)) & set(range(config.num_layers))
        read_layers = {_layer_of(k) for k in source.read} - {None}
        assert read_layers == my_blocks, (family, rank, read_layers, my_blocks)  # its stage only
        assert ("lm_head.weight" in source.read) == (stage == 1 and not config.tie_embeddings)
        assert ("model.norm.weight" in source.read) == (stage == 1)

        x = tokens(config.vocab_size, seed=dp)
        B, S = x.shape
        with torch.no_grad():
            if stage == 0:
                dist.send(module(x).contiguous(), dst=topology.get_rank(pipe=1, data=dp))
            else:
                h = torch.empty(B, S, config.hidden_size)
                dist.recv(h, src=topology.get_rank(pipe=0, data=dp))
                err = relative_error(module(h), reference(x).logits)
                assert err <= 1e-5, (family, "PP=2 EP=2", rank, err)
        dist.barrier()


TRAINED = ("mixtral", "qwen2_moe", "glm4_moe")  # + shared expert with its gate; groups, scaling, correction bias
LR, STEPS = 1e-2, 2


def _pipeline_training(rank: int, cases: list[tuple[str, str]], out_dir: str) -> None:
    """Two optimizer steps of the pipeline under DeepSpeed's engine at (PP, EP, DP) = (2, 2, 2) give
    the losses of the plain model trained in this process on the same global batch with AdamW; the
    topology-free checkpoint of the pipeline, exported to the Hub layout, loads in transformers with
    the plain model's logits."""
    from moe_parallel.integration.engine import build_engine

    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=2)
    topology = state.deepspeed_topology()
    stage, dp = state.stage_id, topology.get_coord(rank).data
    overrides = {"aux_loss_coeff": 0.0}  # the aux-loss gradient is scaled per engine; the LM loss suffices here
    for family, path in cases:
        if family not in TRAINED:
            continue
        config = hf.load_config(path, moe_overrides=overrides)
        # ZeRO-1/2 hang in DeepSpeed when a pipeline stage holds no MoE layer (its grad-norm step makes
        # one all-reduce over the pipe group per optimizer param group, and only MoE stages have
        # expert groups): such layouts train with ZeRO-0 here.
        parts = decoder_pipeline_parts(config, 2)
        moe_on_every_stage = all(
            set(range(parts[s] - 1, parts[s + 1] - 1)) & set(config.moe_layer_numbers) for s in range(2)
        )
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 1 if moe_on_every_stage else 0}}  # fmt: skip
        module = decoder_pipeline(config, ep_group=state.ep_group, topology=topology)
        hf.load_weights(module, path)
        engine, _, _ = build_engine(module, ds, lr=LR, weight_decay=0.0)
        batches = [[_batch(config, step, d) for d in range(2)] for step in range(STEPS)]
        losses = [float(engine.train_batch(data_iter=iter([batches[s][dp]]))) for s in range(STEPS)]

        plain = hf.from_pretrained(path, moe_overrides=overrides).train()
        optimizer = torch.optim.AdamW(plain.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        want = []
        for step in range(STEPS):
            loss = sum(lm_loss(plain(x), y) for x, y in batches[step]) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            want.append(float(loss))
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=2e-5, atol=0, msg=family)
        assert want[1] != want[0]  # the step moved the weights

        saved = save_checkpoint(engine, Path(out_dir) / f"{family}_ckpt")
        export = Path(out_dir) / f"{family}_trained"
        if rank == 0:
            weights = export_consolidated(saved)
            # Checkpoints hold parameters; persistent buffers (GLM's correction bias) come from the model.
            weights.update({k: v for k, v in plain.state_dict().items() if k not in weights})
            hf.save_state_dict(weights, config, export, tokenizer_dir=path)
        dist.barrier()
        # The trained pipeline and transformers on its export give the same logits.
        x = tokens(config.vocab_size, seed=9 + dp)
        module.eval()
        with torch.no_grad():
            if stage == 0:
                dist.send(module(x).contiguous(), dst=topology.get_rank(pipe=1, data=dp))
            else:
                h = torch.empty(*x.shape, config.hidden_size)
                dist.recv(h, src=topology.get_rank(pipe=0, data=dp))
                loaded, info = _load_with_info(export)
                assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
                err = relative_error(module(h), loaded.eval()(x).logits)
                assert err <= 1e-5, (family, "trained export", err)
        dist.barrier()


def _batch(config, step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = tokens(config.vocab_size, seed=100 * step + dp, seq=9)
    return seq[:, :-1], seq[:, 1:]


def _run(rank: int, world: int, cases: list[tuple[str, str]], out_dir: str) -> None:
    _expert_parallel(rank, cases, out_dir)
    _pipeline(rank, cases)
    _pipeline_training(rank, cases, out_dir)


def test_every_family_at_ep2_and_pp2_ep2_matches_transformers(tmp_path):
    cases = []
    for i, family in enumerate(FAMILIES):
        path = tmp_path / family
        save_hf_model(random_hf_config(family, 10 + i, even_experts=True), 10 + i, path, max_shard_size="8KB")
        cases.append((family, str(path)))
    run_distributed(_run, WORLD, cases, str(tmp_path), timeout=600)
