"""CPU-only CI guard: every CUDA source compiles (CI has nvcc but no GPU and a CPU torch), so a
broken kernel or glue file cannot land silently. Skips when nvcc is not found."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "cpp").rglob("*.cu"))
GLUE_FILES = sorted((ROOT / "cpp" / "cuda").glob("*.cpp"))


def find_nvcc():
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


def test_there_are_cuda_sources():
    assert CU_FILES and GLUE_FILES


@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=[p.name for p in CU_FILES])
def test_kernel_compiles_for_sm90a(path, tmp_path):
    # The kernels are torch-free: only cpp/ on the include path, the flags CMakeLists.txt uses.
    run([NVCC, "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Werror",
         "all-warnings", "-gencode=arch=compute_90a,code=sm_90a", "-I", str(ROOT / "cpp"),
         str(path), "-o", str(tmp_path / "k.o")])


@needs_nvcc
@pytest.mark.parametrize("path", GLUE_FILES, ids=[p.name for p in GLUE_FILES])
def test_glue_compiles_against_torch_headers(path, tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [str(ROOT / "cpp"), *cpp_extension.include_paths(),
                str(Path(NVCC).parent.parent / "include")]
    # A CPU wheel of torch ships c10/cuda but not the header its CMake generates for CUDA builds.
    macros = (Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl"
              / "cuda_cmake_macros.h")
    if not macros.exists():
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    run([cxx, "-std=c++17", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
         *[f"-I{i}" for i in includes], str(path)])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
