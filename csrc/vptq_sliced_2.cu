// The sliced GEMV's kernel instances and launches for a tile of 2 tokens (vptq_sliced.cuh).
#include "vptq_sliced.cuh"

namespace vptq {
VPTQ_SLICED_TILE(2)
}  // namespace vptq
