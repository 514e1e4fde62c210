"""megatron-ce: Compressed Experts for megatron-core MoE layers (arXiv 2503.00634)."""

from setuptools import find_packages, setup

setup(
    name="megatron-ce",
    version="0.1.0",
    description="Compressed Experts (CE) on megatron-core MoE layers; Phi-MoE/OLMoE conversion and SFT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ce", "megatron_ce.*"]),
    install_requires=[
        # torch is not pinned here: `pip install torch==2.13.0` first takes the local CPU build;
        # an unpinned torch requirement would pull a multi-GB CUDA build on a CPU machine.
        "torch>=2.6",
        # 0.16.1: newest megatron-core that installs on Python 3.11 (0.17+ needs Python 3.12) and
        # the last with the legacy GroupedMLP. See README "Why megatron-core 0.16.1".
        "megatron-core==0.16.1",
        "psutil",  # undeclared dependency of megatron-core's dist_checkpointing.save
        "transformers>=4.46",
        "datasets",
        "tensorboard",
        "sentencepiece",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "grouped_gemm"],
        # Pinned: task definitions (prompts, filters, shot counts) change scores between releases.
        "eval": ["lm-eval[hf]==0.4.13"],
        # lm-eval is in the test extra so CI runs the evaluation end to end (tests/tools/test_evaluate.py).
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "matplotlib", "ruff==0.17.6", "lm-eval[hf]==0.4.13"],
    },
    package_data={"megatron_ce.eval": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
)
