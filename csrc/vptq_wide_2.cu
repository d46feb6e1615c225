// The wide GEMV's kernel instances and launches for a tile of 2 tokens (vptq_gemv.cuh).
#include "vptq_gemv.cuh"

namespace vptq {
VPTQ_WIDE_TILE(2)
}  // namespace vptq
