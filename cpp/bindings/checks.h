// Argument checks shared by every device's implementation of an op, so CPU and CUDA can never
// disagree on what is legal. Messages print the values compared and the expected shape.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "kernels/reinit.h"

namespace uora {

// "name: expected [r, max_in] = [8, 96], got [8, 95]"
void check_shape(const at::Tensor& t, const char* name, const char* spec,
                 const std::vector<int64_t>& expected);
void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype);
void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name);
void check_contiguous(const at::Tensor& t, const char* name);

// reinit_: checks every argument and returns the kernel params.
kernels::ReinitParams reinit_params(const at::Tensor& lambda_d, const at::Tensor& counts,
                                    const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& a0, const at::Tensor& qa,
                                    const at::Tensor& b0, const at::Tensor& qb, double tau,
                                    int64_t k, double alpha, const at::Tensor& fires);

// mix_projections: checks and returns params (outputs allocated by the caller).
kernels::MixParams mix_params(const at::Tensor& a0, const at::Tensor& qa, const at::Tensor& b0,
                              const at::Tensor& qb, const at::Tensor& p, const at::Tensor& a,
                              const at::Tensor& b);

}  // namespace uora

namespace uora {

// Sizes of one multi-adapter group call (uora_group_), after every argument was checked.
struct GroupShape {
  int64_t rows = 0, in = 0, ny = 0, slots = 0, modules = 0, r = 0, R = 0, nb = 0;
};

GroupShape check_group_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a_cat,
                            const at::Tensor& b_cat, const at::Tensor& lambda_d,
                            const at::Tensor& lambda_b, const at::Tensor& p,
                            const at::Tensor& slot, at::IntArrayRef modules,
                            at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                            at::IntArrayRef outs, bool with_q);

// uora_expand_: u [T, >= R] replaces x and a_cat; u may be float32 or y's dtype.
GroupShape check_expand_args(const at::Tensor& y, const at::Tensor& u, const at::Tensor& b_cat,
                             const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                             const at::Tensor& p, const at::Tensor& slot, at::IntArrayRef modules,
                             at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                             at::IntArrayRef outs, bool with_q);

}  // namespace uora

namespace uora {

// Sizes of one paged_attention_ call, after every argument was checked (shapes, dtypes, devices,
// layouts: what every device can check without reading the tables).
struct PagedAttentionShape {
  int64_t tokens = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t num_blocks = 0, block_size = 0, seqs = 0, max_blocks = 0;
};

PagedAttentionShape check_paged_attention_args(const at::Tensor& out, const at::Tensor& q,
                                               const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start, double scale);

}  // namespace uora
