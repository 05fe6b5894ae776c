"""moe_parallel: expert-parallel Mixture-of-Experts layers for DeepSpeed/Megatron-style clusters."""

from setuptools import find_packages, setup

setup(
    name="moe_parallel",
    version="0.1.0",
    description=(
        "Expert-parallel MoE layers with capacity-factor token dropping and all-to-all dispatch, "
        "for DeepSpeed pipelines configured by Hydra and launched through Slurm."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["moe_parallel", "moe_parallel.*", "launch", "launch.*"]),
    install_requires=[
        # The Makefile installs a CPU build of torch first on CPU machines; a range keeps an
        # existing (cluster) torch untouched. 2.6: the first whose weights_only=True loader is a
        # safe boundary (checkpoints are read with it).
        "torch>=2.6",
        "deepspeed>=0.16",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "sentencepiece>=0.2",
        # Hugging Face interop (moe_parallel.hf): config classes, forward oracle in tests, tokenizers.
        "transformers>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy",
        "matplotlib>=3.5",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
    },
)
