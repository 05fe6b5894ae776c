"""Structured (typed) configuration of the training app; ``conf/`` holds the YAML that fills it.

Hydra checks types and unknown keys against these dataclasses when it composes the config (its error
names the key, e.g. ``moe.top_k``); :func:`validate` then checks values through the library's own
config classes, whose errors also name the field and what is allowed. The DeepSpeed JSON is
generated from this config by :func:`deepspeed_config`: there is one source of truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from launch.data import DataConfig
from moe_parallel.core.config import MoEConfig
from moe_parallel.integration.parallel import ParallelLayout
from moe_parallel.models import DecoderConfig, GPTConfig
from moe_parallel.training.metrics import CollapseThresholds, MoEMetricsError


class AppConfigError(ValueError):
    """A training-app setting is out of range; the message names the key and the fix."""


# The typed schema. Each key's description is its trailing comment, or else the comment block directly
# above it: docs/config.md is generated from them (python -m launch.config_reference --write).


@dataclass
class ModelConf:
    """The model: the reference MoE-GPT (``kind=gpt``) or a Hugging Face model (``model=hf``).

    With ``kind=hf`` the shape comes from ``model.path``'s config.json, and the shape keys (``num_layers``
    to ``init_std``) are not read.
    """

    kind: str = "gpt"  # gpt: the reference MoE-GPT | hf: a Hugging Face model (model=hf, model.path)
    path: str | None = None  # kind=hf: the model directory (config.json, *.safetensors, tokenizer files)
    upcycle_experts: int | None = None  # kind=hf from a dense Llama/Qwen3: experts per MoE layer (upcycling)
    upcycle_top_k: int = 2  # kind=hf, upcycling: experts per token
    # kind=hf, DeepSeek-V3 multi-token prediction: how many of the checkpoint's MTP modules to train
    # (null: all of config.json's num_nextn_predict_layers; 0: none, skipped as transformers skips them).
    mtp_layers: int | None = None
    # kind=hf: the weight of the MTP modules' mean loss beside the LM loss (Megatron's mtp_loss_scaling_factor)
    mtp_loss_weight: float = 0.1
    num_layers: int = 4  # transformer blocks
    hidden_size: int = 128  # model width (embedding and residual stream)
    num_heads: int = 4  # attention heads (hidden_size / num_heads per head)
    ffn_hidden_size: int = 512  # hidden width of the dense FFNs (and of the experts unless moe.expert_ffn_hidden_size)
    moe_every: int = 2  # block i is MoE iff (i + 1) % moe_every == 0; 0 = no MoE block (needs dense=true)
    dense: bool = False  # true: a model without MoE blocks, on purpose (moe_every=0); refused otherwise
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    activation: str = "gelu"  # gelu | swiglu | relu | silu
    tie_embeddings: bool = True  # the LM head shares the token embedding's weight
    dropout: float = 0.0  # dropout probability (after the position embedding and in the blocks)
    init_std: float = 0.02  # std of the normal weight initialisation
    init_seed: int = 1234  # every weight is seeded from this and its name (upcycling: the new routers)


@dataclass
class MoEConf:
    """The MoE layers: routing, capacity, load balancing and the experts' compute path.

    With ``model=hf`` (``moe=hf``) config.json decides the architecture; only the training settings
    apply (capacity, losses, router noise, balancing, ``expert_gemm``, ``check_inputs``).
    """

    num_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts per token
    expert_ffn_hidden_size: int | None = None  # hidden width of each expert; null: model.ffn_hidden_size
    score_func: str = "softmax"  # softmax | sigmoid
    normalize_top_k: bool = True  # divide the k combine weights by their sum (top_k >= 2)
    score_after_topk: bool = False  # softmax over the k selected logits only
    num_groups: int = 1  # group-limited routing (DeepSeek-V3): the experts form num_groups equal groups
    topk_groups: int = 1  # tokens choose among the experts of their topk_groups best groups
    group_score: str = "top2_sum"  # a group's score: top2_sum (DeepSeek-V3) | max (DeepSeek-V2)
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combine weights
    router_bias: bool = False  # a trained bias on the router's logits (GPT-OSS)
    input_weighted: bool = False  # combine weights scale the expert's input, not its output (Llama 4)
    selection_bias: bool = False  # a per-expert bias for selection only (implied by expert_bias_update_rate > 0)
    router_noise: str = "none"  # training noise: none | jitter (on the router's input) | gumbel (on selection)
    router_jitter_eps: float = 0.01  # router_noise=jitter: the input is scaled by uniform [1 - eps, 1 + eps]
    capacity_factor: float | None = 1.25  # per-expert capacity in training, x a balanced share; null = dropless
    eval_capacity_factor: float | None = 2.0  # the same in evaluation; null = dropless
    min_capacity: int = 4  # the least capacity an expert has, whatever the factor
    drop_policy: str = "probs"  # over capacity, keep first: probs (highest weights) | position (first choices)
    aux_loss_coeff: float = 0.01  # weight of the load-balancing loss
    z_loss_coeff: float = 0.001  # weight of the router z-loss (keeps the logits small)
    expert_bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing
    shared_expert_ffn_hidden_size: int = 0  # hidden width of an always-on shared expert; 0 = none
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert's output (Qwen2-MoE)
    # auto (CUDA bf16: grouped; CPU: loop or padded by the cost model, experts/choice.py) | grouped | loop | padded
    expert_gemm: str = "auto"
    check_inputs: bool = False  # NaN/Inf checks on each MoE layer's input (a host sync per layer)


@dataclass
class ParallelConf:
    """The parallel layout: pipeline stages and expert parallelism; the rest of the world is data parallel."""

    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel size (divides world / pp)
    backend: str | None = None  # null: nccl on GPUs, gloo on CPUs
    timeout_s: int = 600  # collectives that wait longer fail instead of hanging


@dataclass
class DeepSpeedConf:
    """The DeepSpeed engine; the DeepSpeed JSON is generated from these keys and ``train.*``."""

    zero_stage: int = 1  # 0, 1 or 2 (3 cannot hold expert-parallel layers)
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16
    grad_clip: float = 1.0  # gradient-norm clipping (DeepSpeed's gradient_clipping)
    activation_checkpointing: bool = False  # recompute each block in backward (pipeline layouts, parallel.pp > 1)
    extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last


@dataclass
class OptimConf:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate, reached after the warmup
    min_lr: float = 3e-4  # the learning rate at the end of the schedule
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps to lr
    schedule: str = "cosine"  # decay from lr to min_lr over train.steps: cosine | linear | constant
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay


@dataclass
class DataConf:
    """The training text, its tokenizer and the token cache."""

    files: list[str] | None = None  # text or JSONL ("text" field) files, globs ok; null: the Python standard library
    max_corpus_bytes: int = 4_000_000  # cap on the default standard-library corpus (whole files, in sorted order)
    vocab_size: int = 2048  # vocabulary of the tokenizer trained on the corpus
    tokenizer_type: str = "bpe"  # the trained SentencePiece tokenizer: bpe | unigram
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.02  # fraction of the tokens held out for validation (whole documents)
    seed: int = 1234  # the order of the training batches (a permutation per epoch); resuming needs the same
    cache_dir: str = "~/.cache/moe_parallel/data"  # tokenizer and token cache (on a cluster: a shared filesystem)
    tokenizer: str | None = None  # a pretrained tokenizer (dir or file); null: model.path with model=hf, else train one


@dataclass
class LoggerConf:
    """Weights & Biases logging; ``<run_dir>/metrics.jsonl`` is written in every mode."""

    mode: str = "offline"  # offline | online | disabled (the JSONL mirror is always written)
    project: str = "moe_parallel"  # W&B project
    entity: str | None = None  # W&B team or user; null: the default one
    group: str | None = None  # W&B group; null: the experiment name
    name: str | None = None  # the run's display name; null: W&B's generated one
    tags: list[str] = field(default_factory=list)  # W&B tags
    heatmap_every: int = 10  # log each layer's expert-load heatmap every this many log calls (0 = never)
    heatmap_window: int = 500  # steps kept in each layer's rolling heatmap
    init_timeout: float = 90.0  # seconds W&B may take to start before the run goes on without it


@dataclass
class TrainConf:
    """The training loop: steps, batch, evaluation, checkpoints and the health checks."""

    steps: int = 300  # optimizer steps of the whole run
    micro_batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metric logs
    eval_every: int = 100  # steps between validation losses
    eval_batches: int = 8  # validation batches per evaluation (the same ones every time)
    ckpt_every: int = 100  # steps between checkpoints (and one after the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept by rotation
    seed: int = 0  # seeds Python's, NumPy's and torch's RNGs (weights: model.init_seed; batch order: data.seed)
    run_dir: str | None = None  # null: runs/<experiment>/<slurm job id or timestamp>
    resume: str = "auto"  # auto (latest checkpoint in run_dir, if any) | never | <checkpoint dir>
    exit_after_steps: int | None = None  # checkpoint and stop after this many steps of this job
    progress: str = "auto"  # auto (a bar on a TTY, log lines otherwise) | bar | lines
    # Divergence guard: stop (exit 65) after this many skipped steps in a row (non-finite loss or gradient
    # norm, or DeepSpeed skipping the update for overflow). Without loss scaling (fp32, bf16) a
    # non-finite loss stops at once.
    max_skipped_steps: int = 3
    # Expert collapse: warn (once per episode, W&B alert, metrics.jsonl) when an MoE layer stays
    # degenerate this many steps in a row (the three thresholds below); 0 turns the check off.
    collapse_window: int = 50
    collapse_min_load_fraction: float = 0.01  # degenerate: an expert under this fraction of the mean load
    collapse_max_load_ratio: float = 3.0  # degenerate: the busiest expert's load above this multiple of the mean
    collapse_min_entropy: float = 0.01  # degenerate: router entropy (nats) below this
    # torch.compile each transformer block (regional compilation, moe_parallel.training.block_compile): the
    # default backend, inductor, needs a C++ compiler on CPUs and Triton on GPUs. The first steps
    # include the compile time.
    compile: bool = False
    # torch.compile's backend for train.compile: inductor (generated kernels), or e.g. aot_eager
    # (the traced forward and backward graphs run with eager kernels: no compiler, quick to build).
    compile_backend: str = "inductor"
    # Start-up memory check (launch/plan.py): every rank refuses a layout whose planned peak per rank
    # exceeds the device's memory: this size (e.g. 80GiB), or null for the GPU's own size (CPUs:
    # unchecked unless declared).
    device_memory: str | None = None
    memory_check: bool = True  # false: train even where the planned peak exceeds the device's memory


@dataclass
class AppConf:
    """The training app's whole configuration: one node per config group, plus ``train``."""

    experiment: str = "default"  # the experiment's name: the run directory's parent and the W&B group
    model: ModelConf = MISSING
    moe: MoEConf = MISSING
    parallel: ParallelConf = MISSING
    deepspeed: DeepSpeedConf = MISSING
    optim: OptimConf = MISSING
    data: DataConf = MISSING
    logger: LoggerConf = MISSING
    train: TrainConf = field(default_factory=TrainConf)


def register_configs() -> None:
    """The schema ``conf/config.yaml`` starts from: every group's YAML merges into its typed node."""
    ConfigStore.instance().store(name="app_schema", node=AppConf)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(*overrides: str) -> DictConfig:
    """The app's config as Hydra composes it from ``conf/`` for ``overrides`` (Hydra's errors name the key),
    outside a Hydra app: for the tools beside ``train.py`` and for tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------- checked library configs


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AppConfigError(f"{key}={value!r} is invalid: choose one of {allowed}")


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise AppConfigError(f"{key}={value!r} is invalid: must be an integer >= {minimum}")


def _moe_blocks(m: ModelConf | DictConfig) -> list[int]:
    """The blocks (0-based, as GPTConfig counts them) of the reference model that hold an MoE FFN."""
    every = m.moe_every
    if not isinstance(every, int) or every <= 0:
        return []
    return [i for i in range(m.num_layers) if (i + 1) % every == 0]


def _check_dense(m: ModelConf | DictConfig) -> None:
    """A model without MoE blocks only when asked for with ``model.dense=true``; never both at once."""
    if not isinstance(m.num_layers, int) or m.num_layers < 1:
        return  # GPTConfig names the bad model.num_layers
    blocks = _moe_blocks(m)
    if m.dense and blocks:
        raise AppConfigError(
            f"model.dense=true, but model.moe_every={m.moe_every} makes blocks {blocks} (counting from 0) of "
            f"model.num_layers={m.num_layers} MoE: set model.moe_every=0 for a dense model, or drop model.dense=true"
        )
    if not m.dense and not blocks and isinstance(m.moe_every, int) and m.moe_every >= 0:
        raise AppConfigError(
            f"model.moe_every={m.moe_every} builds no MoE layer in model.num_layers={m.num_layers} blocks: the "
            f"model would train dense. Set model.moe_every to 1..{max(1, m.num_layers)} (every k-th block is "
            "MoE; model.moe_every=1: all of them), or model.dense=true to train a dense model on purpose"
        )


def gpt_config(cfg: AppConf | DictConfig, vocab_size: int) -> GPTConfig:
    """The model's :class:`GPTConfig` (its errors name ``model.*`` / ``moe.*`` fields).

    A config that builds no MoE block is refused unless ``model.dense=true`` says it is meant.
    """
    m, moe = cfg.model, cfg.moe
    _check_dense(m)
    # No MoE block, as asked for (moe_every=0, or larger than num_layers): the same model as moe_every=0.
    dense = isinstance(m.moe_every, int) and m.moe_every >= 0 and not _moe_blocks(m)
    moe_fields = {f.name for f in fields(MoEConfig)}
    moe_dict = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(moe)).items() if k in moe_fields}
    moe_dict["ffn_hidden_size"] = moe.expert_ffn_hidden_size or m.ffn_hidden_size
    return GPTConfig(
        vocab_size=vocab_size,
        seq_len=cfg.data.seq_len,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        moe_every=0 if dense else m.moe_every,
        moe=None if dense else moe_dict,
        norm=m.norm,
        activation=m.activation,
        tie_embeddings=m.tie_embeddings,
        dropout=m.dropout,
        init_std=m.init_std,
        init_seed=m.init_seed,
    )


def is_hf(cfg: AppConf | DictConfig) -> bool:
    """Whether the model comes from a Hugging Face directory (``model=hf``)."""
    return cfg.model.kind == "hf"


def model_config(cfg: AppConf | DictConfig, vocab_size: int) -> GPTConfig | DecoderConfig:
    """The model's library config: :class:`GPTConfig` (``model.kind=gpt``) or, for ``model=hf``, the
    :class:`DecoderConfig` of ``model.path`` (whose vocabulary is config.json's, not ``vocab_size``)."""
    if is_hf(cfg):
        from launch import hf_model

        return hf_model.decoder_config(cfg)
    return gpt_config(cfg, vocab_size)


def collapse_thresholds(cfg: AppConf | DictConfig) -> CollapseThresholds | None:
    """The expert-collapse check's thresholds (None: ``train.collapse_window=0``, off)."""
    t = cfg.train
    if t.collapse_window == 0:
        return None
    try:
        return CollapseThresholds(
            min_load_fraction=t.collapse_min_load_fraction,
            max_load_ratio=t.collapse_max_load_ratio,
            min_entropy=t.collapse_min_entropy,
            window=t.collapse_window,
        )
    except MoEMetricsError as exc:
        name = str(exc).split("=")[0]
        key = {"window": "collapse_window"}.get(name, f"collapse_{name}")
        raise AppConfigError(f"train.{key}{str(exc)[len(name) :]}") from None


def data_config(cfg: AppConf | DictConfig) -> DataConfig:
    d = cfg.data
    tokenizer = d.tokenizer if d.tokenizer is not None else (cfg.model.path if is_hf(cfg) else None)
    return DataConfig(
        files=list(d.files) if d.files is not None else None,
        max_corpus_bytes=d.max_corpus_bytes,
        vocab_size=d.vocab_size,
        tokenizer_type=d.tokenizer_type,
        seq_len=d.seq_len,
        val_fraction=d.val_fraction,
        seed=d.seed,
        cache_dir=d.cache_dir,
        tokenizer=tokenizer,
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str | int, key: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB`` or a plain byte count; the error names ``key``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if isinstance(text, bool) or match is None or match.group(2).lower() not in _UNITS:
        raise AppConfigError(f"{key}={text!r} is not a size: write e.g. 80GiB, 80GB or 81920MiB (GiB = 2^30 bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise AppConfigError(f"{key}={text!r} must be a positive size")
    return size


def _check_compile(value: Any, backend: Any = "inductor") -> None:
    """``train.compile``: a boolean, and, when true, a torch.compile that can run here: dynamo supports
    this Python, ``train.compile_backend`` names one of its backends, and inductor finds what it builds
    kernels with (Triton on GPUs, a C++ compiler on CPUs)."""
    if not isinstance(value, bool):
        raise AppConfigError(f"train.compile={value!r} is invalid: must be true or false")
    if not value:
        return
    import torch

    if not torch._dynamo.is_dynamo_supported():
        raise AppConfigError(
            f"train.compile=true needs torch.compile, which torch {torch.__version__} does not support on this "
            "Python: set train.compile=false, or use a Python that torch.compile supports"
        )
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = sorted(set(torch._dynamo.list_backends()) | {"aot_eager", "eager"})
        raise AppConfigError(
            f"train.compile_backend={backend!r} is not a torch.compile backend: choose one of {', '.join(usual)}"
        )
    if backend != "inductor":
        return
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        if not has_triton():
            raise AppConfigError(
                "train.compile=true compiles GPU kernels with Triton, which is not importable here: install the "
                "triton that matches torch (pip install triton), or set train.compile=false"
            )
        return
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()  # what inductor runs: $CXX, else g++ (cl on Windows)
    except Exception as err:  # InvalidCxxCompiler, or the platform's own "not found"
        raise AppConfigError(
            f"train.compile=true builds CPU kernels with a C++ compiler, and torch finds none ({type(err).__name__}): "
            "install one (e.g. g++) or name it in the CXX environment variable, or set train.compile=false"
        ) from None


def validate(cfg: AppConf | DictConfig, world_size: int) -> None:
    """Check every value before any process group or collective exists."""
    t, ds, o = cfg.train, cfg.deepspeed, cfg.optim
    for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "ckpt_every"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.keep_checkpoints", t.keep_checkpoints, minimum=1)
    if t.exit_after_steps is not None:
        _positive("train.exit_after_steps", t.exit_after_steps)
    _choice("train.progress", t.progress, ("auto", "bar", "lines"))
    _positive("train.max_skipped_steps", t.max_skipped_steps)
    _positive("train.collapse_window", t.collapse_window, minimum=0)
    collapse_thresholds(cfg)
    _check_compile(t.compile, t.compile_backend)
    if not isinstance(t.memory_check, bool):
        raise AppConfigError(f"train.memory_check={t.memory_check!r} is invalid: must be true or false")
    if t.device_memory is not None:
        parse_bytes(t.device_memory, "train.device_memory")
    _positive("parallel.timeout_s", cfg.parallel.timeout_s)
    _choice("deepspeed.precision", ds.precision, ("auto", "fp32", "bf16"))
    _choice("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2))
    _choice("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    if not o.lr > 0 or not 0 <= o.min_lr <= o.lr:
        raise AppConfigError(f"optim.lr={o.lr}, optim.min_lr={o.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
    if o.warmup_steps < 0:
        raise AppConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _choice("model.kind", cfg.model.kind, ("gpt", "hf"))
    if not is_hf(cfg) and (cfg.model.path is not None or cfg.model.upcycle_experts is not None):
        raise AppConfigError(
            "model.path / model.upcycle_experts are read only with model.kind=hf: select it with model=hf"
        )
    if not is_hf(cfg) and (cfg.model.mtp_layers is not None or cfg.model.mtp_loss_weight != ModelConf.mtp_loss_weight):
        raise AppConfigError(
            "model.mtp_layers / model.mtp_loss_weight are read only with model.kind=hf (multi-token prediction of "
            "a DeepSeek-V3 checkpoint): select it with model=hf, or drop them"
        )
    if is_hf(cfg) and cfg.model.dense:
        raise AppConfigError("model.dense is read only with model.kind=gpt: with model=hf, config.json decides")
    data_config(cfg)
    if is_hf(cfg):
        from launch import hf_model

        model = hf_model.validate(cfg)  # config.json and every weight's name and shape
    else:
        model = gpt_config(cfg, vocab_size=cfg.data.vocab_size)
    ParallelLayout(world_size, cfg.parallel.pp, cfg.parallel.ep, model.moe.num_experts if model.moe else None)
    if cfg.parallel.pp > model.num_layers:
        key = "model.path's config.json num_hidden_layers" if is_hf(cfg) else "model.num_layers"
        raise AppConfigError(
            f"parallel.pp={cfg.parallel.pp} stages for {key}={model.num_layers} blocks: use at most one stage per block"
        )


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: AppConf | DictConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, generated from the Hydra config."""
    ds, t = cfg.deepspeed, cfg.train
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": resolve_precision(ds.precision) == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    config.update(OmegaConf.to_container(OmegaConf.create(dict(ds.extra))) if ds.extra else {})
    return config
