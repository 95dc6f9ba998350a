"""Builds pf_engine._C (always) and pf_engine._C_cuda (where CUDA is, or when forced).

PF_ENGINE_CUDA=1 forces the CUDA module (an error without nvcc), PF_ENGINE_CUDA=0
skips it; unset, it is built when nvcc and a CUDA driver are both found.
PF_ENGINE_CUDA_ARCHS (default "80;90") lists the GPU architectures to build for.
"""

import ctypes.util
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# The Triton kernels' folder is called kernels/, and so is Hugging Face's package (transformers
# needs it), which hooks setuptools' egg_info: run from this folder, `import kernels` would find
# ours. Nothing here imports from this folder, so it leaves sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

CUDA_SOURCES = sorted(os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join("csrc", "cuda"))
                      if f.endswith(".cu"))


def find_cuda_home():
    """The CUDA toolkit folder holding include/cuda_runtime.h, or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.insert(2, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        header, compiler = os.path.join(home, "include", "cuda_runtime.h"), os.path.join(home, "bin", "nvcc")
        if os.path.exists(header) and os.path.exists(compiler):
            return home
    return None


def has_cuda_driver():
    return ctypes.util.find_library("cuda") is not None or os.path.exists("/dev/nvidiactl")


def cuda_home_to_build():
    flag = os.environ.get("PF_ENGINE_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"PF_ENGINE_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return None
    home = find_cuda_home()
    if flag == "1" and home is None:
        raise SystemExit("PF_ENGINE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
    if flag == "" and not has_cuda_driver():
        return None
    return home


def gencode_flags():
    archs = [a.strip() for a in os.environ.get("PF_ENGINE_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest arch lets the driver JIT for GPUs newer than the list.
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the .cu sources of the CUDA module."""

    def build_extension(self, ext):
        if ext.name == "pf_engine._C_cuda":
            os.makedirs(self.build_temp, exist_ok=True)
            nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
            for src in CUDA_SOURCES:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode_flags()]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
        super().build_extension(ext)


CUDA_HOME = cuda_home_to_build()

ext_modules = [
    Pybind11Extension(
        "pf_engine._C",
        ["csrc/block_manager.cpp", "csrc/resample.cpp", "csrc/attention.cpp", "csrc/sampling.cpp",
         "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        # No code here reads floating-point exception flags; without this the compiler
        # will not turn the branch-free selects of resample.cpp into vector code.
        extra_compile_args=["-O3", "-fno-trapping-math"],
    )
]
if CUDA_HOME is not None:
    ext_modules.append(
        Pybind11Extension(
            "pf_engine._C_cuda",
            ["csrc/cuda_bindings.cpp"],
            include_dirs=["csrc", os.path.join(CUDA_HOME, "include")],
            library_dirs=[os.path.join(CUDA_HOME, "lib64")],
            # Static cudart: the module needs only the driver at run time.
            libraries=["cudart_static", "rt", "pthread", "dl"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )
else:
    print("pf_engine: building without the CUDA extension (no CUDA toolkit and driver, or PF_ENGINE_CUDA=0)")

setup(
    # pf_engine.data holds no Python, only the demo's problems: listed as a package so
    # that setuptools ships its files without warning about an unlisted importable folder.
    packages=find_packages(include=["pf_engine", "pf_engine.*"]) + ["pf_engine.kernels", "pf_engine.data"],
    package_dir={"pf_engine.kernels": "kernels"},
    package_data={"pf_engine.data": ["*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
