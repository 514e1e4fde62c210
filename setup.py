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
        # Two supported lines (README "Which megatron-core"): 0.16.1 is the newest release that installs
        # on Python 3.11 (0.17+ needs 3.12); on 3.12, 0.19.x. megatron_ce.compat holds every difference
        # and refuses other versions at import.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.19.2,<0.20; python_version >= '3.12'",
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
        # Pinned to what each megatron-core line was released against (its own dev/te extras): TE
        # 2.9-2.11 for 0.16.1, which also runs the legacy grouped GEMM (nv-grouped-gemm, gone in 0.17);
        # 0.19.x uses TE >= 2.14 features. The PyPI package named `apex` is unrelated: never add it.
        "gpu": [
            "transformer-engine[pytorch]>=2.9,<2.12; python_version < '3.12'",
            "nv-grouped-gemm~=1.1; python_version < '3.12'",
            "transformer-engine[pytorch]>=2.14,<2.21; python_version >= '3.12'",
        ],
        # Pinned: task definitions (prompts, filters, shot counts) change scores between releases.
        "eval": ["lm-eval[hf]==0.4.13"],
        # lm-eval is in the test extra so CI runs the evaluation end to end (tests/tools/test_evaluate.py).
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "matplotlib", "ruff==0.17.6", "lm-eval[hf]==0.4.13"],
    },
    package_data={"megatron_ce.eval": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
)
