// Reinit and projection rebuild on the GPU (math and rounding: reinit.h) — torch-free interface.
// Asynchronous on `stream`, no allocation, no read-back: capturable in a CUDA graph.
#pragma once
#include <cuda_runtime.h>

#include "kernels/reinit.h"

namespace uora::kernels {

// Two kernels: per index i (counters, fires[i], the record p[i]), then the rewrite of the fired rows
// of A and columns of B with mix_value, exactly as reinit_cpu rounds.
cudaError_t reinit_cuda(const ReinitParams& params, cudaStream_t stream);

// A, B from (A0, QA, B0, QB, p), element by element with mix_value.
cudaError_t mix_projections_cuda(const MixParams& params, cudaStream_t stream);

}  // namespace uora::kernels
