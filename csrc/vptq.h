// VPTQ lookup kernels: the launcher interface shared by vptq_kernels.cu and vptq_ops.cpp.
// Torch-free on purpose, so the .cu file compiles with bare nvcc (CI has no GPU build of torch).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace vptq {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// One quantized layer. Float tensors are in the activation dtype. Null pointers mean "absent".
// Stored column y (0 <= y < K) holds original column perm[y]; inv_perm is its inverse.
struct Layer {
  const int32_t* indices = nullptr;       // [G, R, W32] packed main|residual indices
  const void* centroids = nullptr;        // [G, k, v]
  const void* res_centroids = nullptr;    // [G, kr, v]
  const int16_t* outlier_indices = nullptr;  // [R0, P] (uint16 values)
  const void* outlier_centroids = nullptr;   // [k0, v0]
  const int32_t* perm = nullptr;          // [K] stored -> original column
  const int32_t* inv_perm = nullptr;      // [K] original -> stored column
  const void* scale = nullptr;            // [K] weight_scale (by original column)
  const void* wbias = nullptr;            // [K] weight_bias  (by original column)
  const void* bias = nullptr;             // [N]
  int N = 0, K = 0, v = 0, k = 0, kr = 0, G = 1, S = 0, P = 0, v0 = 0, k0 = 0;
  int b1 = 0, b2 = 0, words = 0;          // main bits, residual bits, int32 words per row
};

// W = dequant(layer): [N, K] row-major in `dtype`. Any v in 2..16, outliers included.
cudaError_t launch_dequant(const Layer& L, void* out, DType dtype, cudaStream_t stream);

// y = x W^T + bias for T tokens without materialising W. x: [T, K], out: [T, N].
// workspace: at least gemv_workspace_floats(...) floats (may be null when that is 0).
bool gemv_supported(const Layer& L, int T);
int gemv_splits(const Layer& L, int T, int num_sms);
size_t gemv_workspace_floats(const Layer& L, int T, int splits);
cudaError_t launch_gemv(const Layer& L, const void* x, int T, void* out, float* workspace,
                        int splits, DType dtype, cudaStream_t stream);

}  // namespace vptq
