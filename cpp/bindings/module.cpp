// The Python module uora_rt._C: importing it registers the tensor ops (schemas.cpp and the device
// files); this module itself holds only what is not a tensor op.
#include <pybind11/pybind11.h>

#include "kernels/householder_qr.h"
#include "kernels/projections.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "uora_rt native core: ops are under torch.ops.uora";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version_at_build"] = UORA_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(UORA_WITH_CUDA);
    info["projection_algorithm"] = uora::kernels::kProjectionAlgorithm;
    info["qr_panel"] = uora::kernels::kQrPanel;
    return info;
  });
}
