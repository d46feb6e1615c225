// The sliced GEMV's launches for a tile of 2 tokens (vptq_sliced.cuh).
#include "vptq_sliced.cuh"

namespace vptq {

cudaError_t launch_sliced_tile2(const SlicedGroup& G, const void* x, int T, DType dtype,
                                cudaStream_t stream) {
  if (dtype == DType::kHalf) return by_v<__half, 2>(G, x, T, stream);
  return by_v<__nv_bfloat16, 2>(G, x, T, stream);
}

}  // namespace vptq
