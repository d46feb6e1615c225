// The sliced lookup-GEMV's entry points (the kernel and its launches: vptq_sliced.cuh; the
// instances for each token tile: vptq_sliced_<tile>.cu).
#include "vptq_sliced.cuh"

namespace vptq {

size_t sliced_smem_bytes(const SlicedLayer& L, int nt) {
  return plan(L, nt, res_copies(L.v, L.res_cw)).total;
}

bool sliced_supported(const SlicedLayer& L, int T, size_t smem_optin) {
  if (T < 1 || T > 8 || L.v < 2 || L.v > 16 || L.v % 2 != 0 || L.v == 14) return false;
  const int nt = tokens_tile(T);
  if (L.v * nt > 32) return false;
  // the last block indexes a layer's partial sums (parts x T x N floats) with int
  if (static_cast<int64_t>(L.parts()) * T * L.N >= (int64_t{1} << 31)) return false;
  return sliced_smem_bytes(L, nt) + kSlicedStaticSmem <= smem_optin;
}

cudaError_t launch_sliced_gemv(const SlicedGroup& G, const void* x, int T, DType dtype,
                               cudaStream_t stream) {
  if (G.n < 1 || G.n > kMaxGroup) return cudaErrorInvalidValue;
  switch (tokens_tile(T)) {
    case 1: return launch_sliced_tile1(G, x, T, dtype, stream);
    case 2: return launch_sliced_tile2(G, x, T, dtype, stream);
    case 4: return launch_sliced_tile4(G, x, T, dtype, stream);
    default: return launch_sliced_tile8(G, x, T, dtype, stream);
  }
}

}  // namespace vptq
