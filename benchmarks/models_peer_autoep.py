"""DeepSpeed AutoEP's side of ``bench_models.py``: one torchrun process, inside ``.venv-autoep``.

AutoEP (DeepSpeed 0.19.8) works with transformers 5.15 and not with the main venv's newer one, so
this script runs in its own venv and imports nothing of this repository except ``models_side``.

The Hugging Face model is loaded from the same directory as ours (``AutoModelForCausalLM``, fp32,
SDPA attention like our decoder). ``deepspeed.initialize`` gets the app's DeepSpeed config (same
micro-batch, ZeRO stage, gradient clipping) plus ``expert_parallel: {enabled, autoep_size: EP,
preset_model: FAMILY}``; AutoEP swaps every MoE block for its dropless layer (softmax top-k
routing, normalised as config.json's ``norm_topk_prob`` says). The optimizer is built after the
swap, the way our ``build_engine`` builds ours: torch AdamW, the same lr, betas, eps and weight
decay on matrices only, expert parameters in DeepSpeed's MoE groups.

``mode=compiled`` adds ``compile: {autoep_non_moe: true}`` and calls ``engine.compile()``: AutoEP's
regional compile (every decoder layer compiled, its MoE layer kept eager). Compiling the whole
model fails on CPU in fp32 (``torch._grouped_mm``'s fake-tensor check accepts bf16 only).
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

STARTED = time.perf_counter()

import models_side  # noqa: E402  (benchmarks/ is this script's sys.path[0])
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCOPES = {
    r"\.self_attn$": "attention",
    r"\.mlp\.(router|gate)$": "router",
    r"\.mlp\.experts$": "experts",
    r"\.mlp$": "dispatch/combine",
}


def autoep_config(spec: dict) -> dict:
    config = {
        **spec["ds_config"],
        "expert_parallel": {"enabled": True, "autoep_size": spec["ep"], "preset_model": spec["family"]},
    }
    if spec["mode"] == "compiled":
        config["compile"] = {"autoep_non_moe": True}
    return config


def optimizer_factory(model: torch.nn.Module, optim: dict):
    """AdamW over the model's parameters after AutoEP's swap, grouped as ``build_engine`` groups ours."""

    def make(_params) -> torch.optim.Optimizer:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim["weight_decay"], "name": "decay"},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"},
        ]
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args()
    spec = models_side.load_spec(args.spec)
    models_side.set_threads(spec["threads"])

    import deepspeed
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=spec["timeout_s"]))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer_factory(model, spec["optim"]), config=autoep_config(spec)
    )
    if spec["mode"] == "compiled":
        engine.compile()

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = engine(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1))

    models_side.serve(engine, loss_fn, spec, args.dir, SCOPES, STARTED)


if __name__ == "__main__":
    main()
