"""Prints what CMake needs to build against the installed torch, one `KEY=value` per line.

We read torch's own layout instead of calling find_package(Torch): its config fails hard for a CUDA
build of torch on a machine without a CUDA toolkit, and we want a CPU-only build there instead.
"""
import os

import torch
from torch.utils import cpp_extension

root = os.path.dirname(torch.__file__)
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}")
print(f"TORCH_LIB_DIR={os.path.join(root, 'lib')}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda or ''}")
