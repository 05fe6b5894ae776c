"""Our side of ``bench_models.py``: one torchrun process of the app's ``model=hf`` training.

Run by the driver in the main venv as ``python -m torch.distributed.run --nproc_per_node EP
benchmarks/models_ours.py --spec SPEC --dir GROUP_DIR``. It builds what ``launch/train.py`` builds
for ``model=hf model.path=HF_DIR parallel.ep=EP``: the Hydra config composed from ``conf/`` with the
spec's overrides, ``initialize_parallel``, the model from ``launch.hf_model.build_model`` (dropless
MoE layers routed as config.json says) and the DeepSpeed engine from ``build_engine`` with
``launch.config.deepspeed_config`` (AdamW, ZeRO stage and gradient clipping of the app). The app
has no learning-rate schedule here (constant ``optim.lr``) and no aux loss (``moe.aux_loss_coeff=0``,
as the HF model trains without ``output_router_logits``). ``mode=compiled`` calls
``engine.compile()`` (the whole model through ``torch.compile``). Then ``models_side.serve``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

STARTED = time.perf_counter()

import models_side  # noqa: E402  (benchmarks/ is this script's sys.path[0])
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Module name -> category of the profiler breakdown (models_side.breakdown).
SCOPES = {
    r"\.attn$": "attention",
    r"\.ffn\.router$": "router",
    r"\.ffn\.experts$": "experts",
    r"\.ffn$": "dispatch/combine",
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch import config as app_config

    app_config.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args()
    spec = models_side.load_spec(args.spec)
    models_side.set_threads(spec["threads"])

    from launch import config as app_config
    from launch import env as launch_env
    from launch import hf_model
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.models import lm_loss

    cfg = compose(spec["ours_overrides"])
    launch_env.init_distributed(launch_env.detect(), "gloo", spec["timeout_s"])
    config = hf_model.decoder_config(cfg)
    state = initialize_parallel(cfg.parallel.pp, cfg.parallel.ep, config.moe.num_experts, timeout=spec["timeout_s"])
    torch.manual_seed(0)
    model, _ = hf_model.build_model(cfg, state, vocab_size=config.vocab_size)
    ds_config = app_config.deepspeed_config(cfg)
    if ds_config != spec["ds_config"]:
        raise RuntimeError(f"the app's DeepSpeed config {ds_config} is not the one the driver gave AutoEP")
    optim = cfg.optim
    engine, _, _ = build_engine(
        model, ds_config, lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2)
    )
    if spec["mode"] == "compiled":
        engine.compile()

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(engine(inputs), targets)

    models_side.serve(engine, loss_fn, spec, args.dir, SCOPES, STARTED)


if __name__ == "__main__":
    main()
