// The sliced GEMV's kernel instances and launches for a tile of 4 tokens (vptq_sliced.cuh).
#include "vptq_sliced.cuh"

namespace vptq {
VPTQ_SLICED_TILE(4)
}  // namespace vptq
