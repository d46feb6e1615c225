// The sliced GEMV's launches for a tile of 4 tokens (vptq_sliced.cuh).
#include "vptq_sliced.cuh"

namespace vptq {

cudaError_t launch_sliced_tile4(const SlicedGroup& G, const void* x, int T, DType dtype,
                                cudaStream_t stream) {
  if (dtype == DType::kHalf) return by_v<__half, 4>(G, x, T, stream);
  return by_v<__nv_bfloat16, 4>(G, x, T, stream);
}

}  // namespace vptq
