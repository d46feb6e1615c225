// The wide GEMV's kernel instances and launches for a tile of 4 tokens (vptq_gemv.cuh).
#include "vptq_gemv.cuh"

namespace vptq {
VPTQ_WIDE_TILE(4)
}  // namespace vptq
