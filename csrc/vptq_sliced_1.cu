// The sliced GEMV's kernel instances and launches for a tile of 1 token (vptq_sliced.cuh).
#include "vptq_sliced.cuh"

namespace vptq {
VPTQ_SLICED_TILE(1)
}  // namespace vptq
