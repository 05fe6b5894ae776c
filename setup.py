"""moe_parallel: expert-parallel Mixture-of-Experts layers for DeepSpeed/Megatron-style clusters."""

from setuptools import find_packages, setup

HF = ["transformers>=5.0", "safetensors>=0.4", "tokenizers>=0.21"]
APP = ["hydra-core>=1.3", "omegaconf>=2.3", "wandb>=0.17", "sentencepiece>=0.2", "matplotlib>=3.5", "tqdm", "psutil"]

setup(
    name="moe_parallel",
    version="0.1.0",
    description=(
        "Expert-parallel MoE layers with capacity-factor token dropping and all-to-all dispatch, "
        "for DeepSpeed pipelines configured by Hydra and launched through Slurm."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["moe_parallel", "moe_parallel.*", "launch", "launch.*"]),
    # What the library (moe_parallel/) imports; the Hugging Face interop and the training app are extras.
    install_requires=[
        # The Makefile installs a CPU build of torch first on CPU machines; a range keeps an
        # existing (cluster) torch untouched. 2.6: the first whose weights_only=True loader is a
        # safe boundary (checkpoints are read with it).
        "torch>=2.6",
        "deepspeed>=0.16",
        "numpy",
    ],
    extras_require={
        # moe_parallel.hf: config classes, the forward oracle in tests, checkpoint files, tokenizers.
        "hf": HF,
        # launch/: the Hydra training app, its logging and plots, the SentencePiece tokenizer; it
        # builds Hugging Face models too, so it brings the hf packages.
        "app": APP + HF,
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
    },
)
