from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "engine" / "__init__.py").read_text().split("from engine")[0], version)

setup(
    name="multimodal-coconut",
    version=version["__version__"],
    description="Chain of Continuous Thought (CoCoNuT) for InternVL3: causal KV-cached latent forward, "
    "Triton kernels, DeepSpeed training",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17",
        "triton>=3.2; platform_system == 'Linux'",
        "deepspeed>=0.16",
        "pillow",
        "pyyaml",
        "safetensors",
        "tqdm",
        "nvtx",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "tensorboard": ["tensorboard"],
        "liger": ["liger-kernel>=0.8"],  # Triton kernels for the loss and the Qwen2 modules (liger_kernels config key)
    },
)
