from setuptools import find_packages, setup

setup(
    name="fsam_ds",
    version="0.1.0",
    description="Fisher SAM (FSAM) for DeepSpeed ZeRO stages 0-3 with an exact sharded top-k mask",
    packages=find_packages(include=["fsam_ds", "fsam_ds.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",            # named parameters in optimizers; CPU installs pin 2.13.0 (see cpu)
        "deepspeed==0.19.8",     # fsam_ds/deepspeed_adapter.py checks private attributes of this
        "transformers>=4.40",
    ],
    extras_require={
        # `pip install torch==2.13.0` is a local CPU build here; any other pin pulls CUDA wheels.
        "cpu": ["torch==2.13.0"],
        "test": ["pytest>=8", "hypothesis>=6", "mpi4py>=3.1"],
    },
)
