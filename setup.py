"""Build linft and its optional C++/CUDA extension ``linft._C``.

Shaped like pytorch/extension-cpp: sources are globbed from ``csrc/`` (C++,
always) and ``csrc/cuda/`` (CUDA, only when a toolkit and a CUDA torch are
present). ``DEBUG=1`` builds with ``-O0 -g``; ``LINFT_NO_EXTENSION=1`` skips
the extension. The package imports and works without it (pure-torch twin).
"""

import glob
import os

from setuptools import find_packages, setup

LIBRARY_NAME = "linft"
HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("LINFT_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch is installed after us: skip, linft JIT-builds later
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not sources:
        return [], {}
    use_cuda = bool(cuda_sources) and torch.cuda.is_available() and CUDA_HOME is not None
    if os.environ.get("FORCE_CUDA", "0") == "1":
        use_cuda = bool(cuda_sources) and CUDA_HOME is not None
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17", "-fdiagnostics-color=always", "-DPy_LIMITED_API=0x03090000"]
    nvcc = ["-O0", "-g"] if debug else ["-O3", "--use_fast_math"]
    nvcc += ["-std=c++17"]
    if use_cuda:
        ext = CUDAExtension(
            f"{LIBRARY_NAME}._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DLINFT_WITH_CUDA"], "nvcc": nvcc},
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            f"{LIBRARY_NAME}._C", sources, extra_compile_args={"cxx": cxx}, py_limited_api=True
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name=LIBRARY_NAME,
    version="0.1.0",
    description="Fast empirical neural tangent kernels of LoRA fine-tuned language models",
    packages=find_packages(include=["linft", "linft.*"]) + ["linft.triton_kernels"],
    package_dir={"linft.triton_kernels": "triton_kernels"},
    package_data={"linft": ["data/*.tsv", "data/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "peft>=0.13",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "plots": ["matplotlib"],
        "test": ["pytest", "pybind11", "ninja", "scipy", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["linft=linft.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
