"""fastvl: the trainer (``fastvl``), the fused ops (``fastvl_kernels``, from kernels/) and their
C++ CPU implementations (``fastvl_kernels._C``, from csrc/).

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already in the environment. Set ``FASTVL_SKIP_CSRC=1`` to skip the C++ build; the ops then fall back
to their PyTorch references on CPU.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("FASTVL_SKIP_CSRC") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "fastvl_kernels._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2"] if os.uname().machine == "x86_64" else ["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="fastvl",
    version="0.1.0",
    description="Kernel-accelerated vision-language pretraining: C-Mask, MaskVLM, MAMO, EPIC",
    python_requires=">=3.10",
    packages=["fastvl_kernels"]
    + ["fastvl"]
    + [f"fastvl.{p}" for p in ("data", "models", "masking", "objectives", "methods", "train", "eval")],
    package_dir={"fastvl_kernels": "kernels", "fastvl": "fastvl"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastvl=fastvl.cli:main"]},
)
