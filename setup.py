"""Builds fusedres and its compiled extensions.

fusedres._C       C++ op schemas, device-generic compositions and the CPU kernels (always).
fusedres._C_cuda  CUDA kernels, built when torch is a CUDA build and a CUDA toolkit is found,
                  also on a machine without a GPU (then for TORCH_CUDA_ARCH_LIST, default
                  sm_80 and sm_90). Set FUSEDRES_NO_CUDA=1 to skip it.
MAX_JOBS limits parallel compile jobs, as for any torch extension.
"""
import glob
import os

# torch guesses CUDA_HOME from the nvcc on PATH (here /usr/local/bin, the wrong root): point it
# at the toolkit before torch.utils.cpp_extension reads it.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda():
    if os.environ.get("FUSEDRES_NO_CUDA", "0") not in ("", "0"):
        return False, "FUSEDRES_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return None  # torch builds for the visible GPUs
    return "8.0;9.0"


# -fopenmp: at::parallel_for runs its OpenMP loop in our own code, serially without it.
cxx_flags = ["-O3", "-fopenmp"]
ext_modules = [
    CppExtension(
        "fusedres._C",
        sources("csrc/fusedres.cpp") + sources("csrc/composite/*.cpp") + sources("csrc/cpu/*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

build_cuda, why = want_cuda()
if build_cuda:
    arch = cuda_arch_list()
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext_modules.append(
        CUDAExtension(
            "fusedres._C_cuda",
            sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    )
else:
    # A CUDA module left by an earlier build would load kernels this build does not match.
    for stale in glob.glob(os.path.join(HERE, "fusedres", "_C_cuda*.so")):
        os.remove(stale)
print(f"fusedres: CUDA kernels {'will' if build_cuda else 'will not'} be built ({why})")

# What was built, for fusedres.info().
with open(os.path.join(HERE, "fusedres", "_build_info.py"), "w") as f:
    f.write("# Written by setup.py at build time.\n")
    f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
    f.write(f"CUDA_BUILT = {build_cuda!r}\n")
    f.write(f"CUDA_REASON = {why!r}\n")
    f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if build_cuda else None!r}\n")

setup(
    packages=["fusedres", "fusedres.kernels"],
    package_dir={"fusedres": "fusedres", "fusedres.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
)
