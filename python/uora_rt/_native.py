"""Loads the compiled core. Importing torch first makes libtorch's symbols available to it."""
import torch  # noqa: F401  (must precede the extension)

import uora_rt._C as _C

build_info = _C.build_info
ops = torch.ops.uora
