// The wide GEMV's kernel instances and launches for a tile of 1 token (vptq_gemv.cuh).
#include "vptq_gemv.cuh"

namespace vptq {
VPTQ_WIDE_TILE(1)
}  // namespace vptq
