"""Builds fusedres and its compiled extensions.

fusedres._C       C++ op schemas, device-generic compositions and the CPU kernels (always).
fusedres._C_cuda  CUDA kernels, built when torch is a CUDA build and a CUDA toolkit is found,
                  also on a machine without a GPU (then for TORCH_CUDA_ARCH_LIST, default
                  sm_80 and sm_90). Set FUSEDRES_NO_CUDA=1 to skip it.
fusedres._C_emulated  the same CUDA sources compiled as host C++ (csrc/emulation): the CUDA
                  kernels run on CPU tensors, for the tests. Set FUSEDRES_NO_EMULATION=1 to
                  skip it.
MAX_JOBS limits parallel compile jobs, as for any torch extension. FUSEDRES_DEBUG=1 builds
for a debugger: -O0 -g, assertions on (host and device: -UNDEBUG), nvcc -G.
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

# torch guesses CUDA_HOME from the nvcc on PATH (here /usr/local/bin, the wrong root): point it
# at the toolkit before torch.utils.cpp_extension reads it.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE)
                  for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


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


DEBUG = os.environ.get("FUSEDRES_DEBUG", "0") not in ("", "0")
OPT = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
# -fopenmp: at::parallel_for runs its OpenMP loop in our own code, serially without it.
CXX_FLAGS = OPT + ["-fopenmp"]
NVCC_FLAGS = ["-O0", "-g", "-G", "-UNDEBUG"] if DEBUG else ["-O3", "-lineinfo"]


def extensions():
    """(ext_modules, CUDA built?, why)."""
    ext_modules = [
        CppExtension(
            "fusedres._C",
            sources("csrc/fusedres.cpp") + sources("csrc/composite/*.cpp")
            + sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if os.environ.get("FUSEDRES_NO_EMULATION", "0") in ("", "0"):
        # The CUDA kernels compiled again as host C++, running on CPU tensors: the tests'
        # `cuda-emulated` backend (csrc/emulation/cuda_runtime.h).
        ext_modules.append(
            CppExtension(
                "fusedres._C_emulated",
                sources("csrc/fusedres.cpp") + sources("csrc/composite/*.cpp")
                + sources("csrc/emulation/*.cpp"),
                extra_compile_args={"cxx": (OPT if DEBUG else ["-O2"])
                                    + ["-DFUSEDRES_CUDA_EMULATION", "-fvisibility=hidden",
                                       "-Wno-unknown-pragmas"]},
            )
        )
    build_cuda, why = want_cuda()
    if build_cuda:
        arch = cuda_arch_list()
        if arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        ext_modules.append(
            CUDAExtension(
                "fusedres._C_cuda",
                sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
    return ext_modules, build_cuda, why


def write_build_info(build_cuda, why):
    """What was built, for fusedres.info()."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None
    with open(os.path.join(HERE, "fusedres", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_BUILT = {build_cuda!r}\n")
        f.write(f"CUDA_REASON = {why!r}\n")
        f.write(f"CUDA_ARCH_LIST = {arch!r}\n")


def _tool_version(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "absent"


def build_key(ext) -> str:
    """Everything a compiled extension depends on: its sources and every header of csrc/, the
    flags, the torch it is built against (version, not path: an isolated build installs the
    same torch in a new temporary directory each time), Python, the compilers, and the build
    environment variables."""
    h = hashlib.sha256()
    files = set(ext.sources) | set(sources("csrc/**/*.h")) | set(sources("csrc/**/*.cuh"))
    if ext.name.endswith("_emulated"):
        files |= set(sources("csrc/cuda/*.cu"))  # included by csrc/emulation/*.cpp
    files = sorted(files)
    for path in files:
        h.update(path.encode())
        with open(os.path.join(HERE, path), "rb") as f:
            h.update(f.read())
    h.update(repr((ext.name, ext.extra_compile_args, ext.extra_link_args, ext.define_macros,
                   torch.__version__, torch.version.git_version, torch.version.cuda,
                   sys.version, _tool_version([os.environ.get("CXX", "c++"), "--version"]),
                   [os.environ.get(v) for v in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CFLAGS",
                                                "CXXFLAGS", "LDFLAGS", "FUSEDRES_NO_CUDA")]))
             .encode())
    if ext.name.endswith("_cuda"):
        h.update(_tool_version([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"]).encode())
    return h.hexdigest()[:16]


class CachedBuildExtension(BuildExtension):
    """Reuses an extension built from the same inputs (build_key) instead of compiling it
    again: a second `pip install -e .` (say with ".[test]") would otherwise rebuild from
    scratch, since pip builds in a fresh temporary directory every time. The cache is
    build/cache/ in the checkout (one entry per extension; delete it to force a rebuild)."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        cache_dir = os.path.join(HERE, "build", "cache")
        cached = os.path.join(cache_dir, f"{ext.name}-{build_key(ext)}.so")
        if os.path.exists(cached):
            print(f"fusedres: reusing {ext.name} from {os.path.relpath(cached, HERE)} (same "
                  f"sources, flags and torch)")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(cached, target)
            return
        super().build_extension(ext)
        os.makedirs(cache_dir, exist_ok=True)
        for old in glob.glob(os.path.join(cache_dir, f"{ext.name}-*.so")):
            os.remove(old)
        shutil.copy2(target, cached)


def main():
    ext_modules, build_cuda, why = extensions()
    # A module left by an earlier build would load kernels this build does not match.
    built = {ext.name.split(".")[-1] for ext in ext_modules}
    for name in ("_C_cuda", "_C_emulated"):
        if name not in built:
            for stale in glob.glob(os.path.join(HERE, "fusedres", f"{name}.*so")):
                os.remove(stale)
    print(f"fusedres: CUDA kernels {'will' if build_cuda else 'will not'} be built ({why})")
    write_build_info(build_cuda, why)
    setup(
        packages=["fusedres", "fusedres.kernels"],
        package_dir={"fusedres": "fusedres", "fusedres.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass={"build_ext": CachedBuildExtension},
    )


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__)
    main()
