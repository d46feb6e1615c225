// y[t,o] = sum_y xhat[t,y] * (C[c,i1][o%v] + R[c,i2][o%v]) + dot(x[t], b) + bias[o],
// xhat[t,y] = x[t, perm[y]] * s[perm[y]]   (vptq-format.md §3.1-3.2; c = group of column y).
//
// dequant: a thread per vector-row n and eight original columns x .. x+7 (v <= 8, no outliers):
//          eight codeword gathers, then one 16-byte store to each row n*v + j of W; else a
//          thread per (n, x), writing W[n*v .. n*v+v-1, x] a value at a time.
// gemv:    one warp per vector-row n; the block stages xhat for a tile of stored columns in
//          shared memory (accumulating its share of dot(x, b) on the way); lanes stride over the
//          tile, decode the packed B-bit index, gather the v-wide codeword(s) with vector loads
//          and accumulate in fp32. Codebooks that fit go to shared memory; the 65536-entry ones
//          are read through L1/L2. Split-K partials go to an fp32 workspace, summed by a
//          second kernel.
// wide:    the gemv for the community schemes (16- to 32-bit index fields, v = 8, 12, 16):
//          lanes take 8 adjacent columns at a time, gathers kept in flight across rows, blocks
//          resident for the whole launch (gemv_wide_kernel, vptq_gemv.cuh); here only the
//          choice of it and of its splits of K.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "vptq.h"
#include "vptq_device.cuh"
#include "vptq_gemv.cuh"

namespace vptq {
namespace {

constexpr int kWarps = 4;             // vector-rows per gemv block
constexpr int kStageFloats = 2048;    // xhat staging: NT tokens x (2048 / NT) columns
// Codebooks in shared memory get what is left of the 48 KB default after the staging buffer and
// the static reduction scratch (a launch above 48 KB would need an opt-in per kernel).
constexpr int kSmemCodebooks = 48 * 1024 - kStageFloats * 4 - 512;

// Element g of a packed row: bits g*B .. g*B+B-1 of a little-endian stream of 32-bit words.
__device__ __forceinline__ uint32_t extract(const uint32_t* row, uint32_t g, int bits) {
  const uint32_t bit = g * static_cast<uint32_t>(bits);
  const uint32_t w = bit >> 5, off = bit & 31;
  uint32_t val = __ldg(row + w) >> off;
  if (off + bits > 32) val |= __ldg(row + w + 1) << (32 - off);
  return bits == 32 ? val : (val & ((1u << bits) - 1u));
}

// The v values of vector-row n at stored column y (outlier or not), before scale and bias.
template <typename T, int V>
__device__ __forceinline__ void dequant_fetch(const Layer& L, int n, int y, int rows,
                                              float (&vals)[V > 0 ? V : 16]) {
  constexpr int kMax = V > 0 ? V : 16;
  const int v = V > 0 ? V : L.v, bits = L.b1 + L.b2;
  if (y < L.P) {
    const T* Co = static_cast<const T*>(L.outlier_centroids);
#pragma unroll
    for (int j = 0; j < kMax; ++j) {
      const int o = n * v + j;
      if (j < v && o < L.N) {
        const uint32_t idx = static_cast<uint16_t>(L.outlier_indices[(o / L.v0) * L.P + y]);
        vals[j] = to_f(Co[idx * L.v0 + o % L.v0]);
      }
    }
    return;
  }
  const T* C = static_cast<const T*>(L.centroids);
  const T* R = static_cast<const T*>(L.res_centroids);
  const int c = (y - L.P) / L.S, g = (y - L.P) - c * L.S;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(L.indices) +
                        (static_cast<size_t>(c) * rows + n) * L.words;
  const uint32_t m = extract(row, g, bits);
  const T* cw = C + (static_cast<size_t>(c) * L.k + (m & ((1u << L.b1) - 1u))) * v;
  const bool res = R != nullptr && L.b2 > 0;
  const uint32_t rcw = (m >> L.b1) & ((1u << L.b2) - 1u);  // the residual codeword
  const T* rw = res ? R + (static_cast<size_t>(c) * L.kr + rcw) * v : nullptr;
  if constexpr (V > 0) {
    load_code<T, V>(cw, vals);
    if (res) {
      float r[V];
      load_code<T, V>(rw, r);
#pragma unroll
      for (int j = 0; j < V; ++j) vals[j] += r[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kMax; ++j)
      if (j < v) vals[j] = to_f(cw[j]) + (res ? to_f(rw[j]) : 0.f);
  }
}

// V > 0: compile-time vector length with vector loads; V == 0: any v <= 16, scalar loads.
// Layers with outliers, K % 8 != 0 or v > 8; the others take dequant8_kernel.
template <typename T, int V>
__global__ void dequant_kernel(Layer L, T* __restrict__ out) {
  constexpr int kMax = V > 0 ? V : 16;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= L.K) return;
  const int v = V > 0 ? V : L.v, rows = (L.N + v - 1) / v;
  const int y = L.inv_perm ? L.inv_perm[x] : x;
  const float s = L.scale ? to_f(static_cast<const T*>(L.scale)[x]) : 1.f;
  const float b = L.wbias ? to_f(static_cast<const T*>(L.wbias)[x]) : 0.f;
  for (int n = blockIdx.y; n < rows; n += gridDim.y) {
    float vals[kMax];
    dequant_fetch<T, V>(L, n, y, rows, vals);
#pragma unroll
    for (int j = 0; j < kMax; ++j) {
      const int o = n * v + j;
      if (j < v && o < L.N) out[static_cast<size_t>(o) * L.K + x] = from_f<T>(fmaf(vals[j], s, b));
    }
  }
}

template <typename T>
__device__ __forceinline__ void copy_to_smem(T* dst, const T* src, int elems) {
  // elems is even (v is even on the fused path): copy 32-bit words.
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int i = threadIdx.x; i < elems / 2; i += blockDim.x) d[i] = __ldg(s + i);
}

template <typename T, int V, int NT>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(Layer L, const T* __restrict__ x, int ntok, T* __restrict__ out,
                float* __restrict__ ws, int splits, int cb_smem) {
  constexpr int kTile = kStageFloats / NT;
  constexpr int kBudget = NT == 1 ? 64 : 32;  // registers for codewords in flight
  constexpr int U = (kBudget / V) < 1 ? 1 : ((kBudget / V) > 8 ? 8 : (kBudget / V));
  extern __shared__ __align__(16) unsigned char smem[];
  float* xs = reinterpret_cast<float*>(smem);                    // [NT][kTile]
  T* smem_books = reinterpret_cast<T*>(smem + kStageFloats * sizeof(float));
  __shared__ float xb_part[kWarps][NT];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = (L.N + V - 1) / V, bits = L.b1 + L.b2;
  const uint32_t mask1 = (1u << L.b1) - 1u, mask2 = (1u << L.b2) - 1u;
  const T* C = static_cast<const T*>(L.centroids);
  const T* R = L.b2 > 0 ? static_cast<const T*>(L.res_centroids) : nullptr;
  if (cb_smem & 1) {
    copy_to_smem(smem_books, C, L.G * L.k * V);
    C = smem_books;
  }
  if ((cb_smem & 2) && R != nullptr) {
    T* dst = smem_books + ((cb_smem & 1) ? L.G * L.k * V : 0);
    copy_to_smem(dst, R, L.G * L.kr * V);
    R = dst;
  }
  const T* scale = static_cast<const T*>(L.scale);
  const T* wbias = static_cast<const T*>(L.wbias);

  const int per_split = ((L.K + splits - 1) / splits + 31) & ~31;
  const int y_begin = blockIdx.y * per_split, y_end = min(L.K, y_begin + per_split);
  const int n = blockIdx.x * kWarps + warp;
  const bool active = n < rows;

  float acc[NT][V];
  float xb[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    xb[t] = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) acc[t][j] = 0.f;
  }

  for (int y0 = y_begin; y0 < y_end; y0 += kTile) {
    const int yt = min(kTile, y_end - y0);
    __syncthreads();  // the previous tile is consumed (first time: codebooks are in smem)
    for (int i = threadIdx.x; i < yt; i += blockDim.x) {
      const int p = L.perm ? L.perm[y0 + i] : y0 + i;
      const float s = scale ? to_f(scale[p]) : 1.f;
      const float b = wbias ? to_f(wbias[p]) : 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float xv = t < ntok ? to_f(x[static_cast<size_t>(t) * L.K + p]) : 0.f;
        xs[t * kTile + i] = xv * s;
        xb[t] += xv * b;
      }
    }
    __syncthreads();
    if (!active) continue;
    for (int i0 = 0; i0 < yt; i0 += 32 * U) {
      uint32_t m[U];
      int grp[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * 32 + lane;
        m[u] = 0;
        grp[u] = 0;
        if (i < yt) {
          const int y = y0 + i;
          const int c = L.G == 1 ? 0 : y / L.S;
          grp[u] = c;
          const uint32_t* row = reinterpret_cast<const uint32_t*>(L.indices) +
                                (static_cast<size_t>(c) * rows + n) * L.words;
          m[u] = extract(row, y - c * L.S, bits);
        }
      }
      float cw[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        load_code<T, V>(C + (static_cast<size_t>(grp[u]) * L.k + (m[u] & mask1)) * V, cw[u]);
        if (R != nullptr) {
          float rw[V];
          load_code<T, V>(R + (static_cast<size_t>(grp[u]) * L.kr + ((m[u] >> L.b1) & mask2)) * V,
                          rw);
#pragma unroll
          for (int j = 0; j < V; ++j) cw[u][j] += rw[j];
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * 32 + lane;
        if (i >= yt) continue;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const float xv = xs[t * kTile + i];
#pragma unroll
          for (int j = 0; j < V; ++j) acc[t][j] = fmaf(xv, cw[u][j], acc[t][j]);
        }
      }
    }
  }

  block_sum<NT, kWarps>(xb, xb_part);  // dot(x, b) over this split's columns
  if (active) finish_row<T, V, NT>(acc, xb, L, n, ntok, out, ws, splits);
}

int smem_codebooks(const Layer& L) {
  const size_t main_bytes = static_cast<size_t>(L.G) * L.k * L.v * 2;
  const size_t res_bytes = L.b2 > 0 ? static_cast<size_t>(L.G) * L.kr * L.v * 2 : 0;
  int flags = 0;
  size_t used = 0;
  if (res_bytes > 0 && res_bytes <= kSmemCodebooks) {
    flags |= 2;
    used += res_bytes;
  }
  if (main_bytes + used <= kSmemCodebooks) flags |= 1;
  return flags;
}

size_t smem_bytes(const Layer& L, int flags) {
  size_t bytes = kStageFloats * sizeof(float);
  if (flags & 1) bytes += static_cast<size_t>(L.G) * L.k * L.v * 2;
  if (flags & 2) bytes += static_cast<size_t>(L.G) * L.kr * L.v * 2;
  return bytes;
}

template <typename T, int V, int NT>
cudaError_t gemv_typed(const Layer& L, const void* x, int T_, void* out, float* ws, int splits,
                       cudaStream_t stream) {
  const int flags = smem_codebooks(L);
  const int rows = (L.N + V - 1) / V;
  const dim3 grid((rows + kWarps - 1) / kWarps, splits);
  gemv_kernel<T, V, NT><<<grid, kWarps * 32, smem_bytes(L, flags), stream>>>(
      L, static_cast<const T*>(x), T_, static_cast<T*>(out), ws, splits, flags);
  return sum_splits<T>(L, T_, out, ws, splits, stream);
}

// Whether the wide GEMV takes the layer at T tokens: fields of 16 bits (no residual) or 24, 28
// or 32 (main <= 16 bits and residual), v = 8, 12 or 16 with few enough tokens for its
// registers, whole octets per group, rows and codebooks aligned for its vector loads.
// VPTQ_WIDE_GEMV=0 turns it off.
bool wide_ok(const Layer& L, int T) {
  static const bool off = switched_off("VPTQ_WIDE_GEMV");
  const int bits = L.b1 + L.b2, nt = tokens_tile(T);
  const bool fields = bits == 16 ? L.b2 == 0
                                 : (bits == 24 || bits == 28 || bits == 32) && L.b1 <= 16 &&
                                       L.b2 > 0 && L.b2 <= 16 && L.res_centroids != nullptr;
  const bool shape = (L.v == 8 && nt <= 4) || ((L.v == 12 || L.v == 16) && nt <= 2);
  const int align = bits % 16 == 0 ? 16 : bits % 8 == 0 ? 8 : 4;  // of an octet's fields
  const int code_align = L.v % 8 == 0 ? 16 : 8;                  // of a codeword
  const auto aligned = [](const void* p, int a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  return !off && fields && shape && L.P == 0 && L.S % 8 == 0 && (L.words * 4) % align == 0 &&
         aligned(L.indices, align) && aligned(L.centroids, code_align) &&
         (L.b2 == 0 || aligned(L.res_centroids, code_align));
}

// Splits of K for the wide GEMV: from the fewest whose xhat fits kWideStageBytes up to one per
// 256 columns (at most 32, so no split is empty), the one with the shortest warp: rounds of rows
// a warp takes in turn, each its split's columns plus about one 256-column step of row overhead
// (the reduction, the pipeline refill), and the block's staging (a round trip per 1024 columns).
int wide_splits(const Layer& L, int T, int num_sms) {
  const int rows = (L.N + L.v - 1) / L.v;
  const int max_cols = kWideStageBytes / (4 * tokens_tile(T));
  const int lo = (L.K + max_cols - 1) / max_cols;
  const int hi = std::max(lo, std::min(L.K / 256, 32));
  int best = lo;
  long best_cost = -1;
  for (int s = lo; s <= hi; ++s) {
    const int cols = wide_per_split(L.K, s);
    const int warps = wide_blocks(L, s, num_sms) * kWideWarps;
    const long rounds = (rows + warps - 1) / warps;
    const long cost = rounds * ((cols + 255) / 256 * 256 + 256) + cols / 4;
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

template <typename T, int NT>
cudaError_t gemv_by_v(const Layer& L, const void* x, int T_, void* out, float* ws, int splits,
                      cudaStream_t stream) {
  switch (L.v) {
    case 2: return gemv_typed<T, 2, NT>(L, x, T_, out, ws, splits, stream);
    case 4: return gemv_typed<T, 4, NT>(L, x, T_, out, ws, splits, stream);
    case 6: return gemv_typed<T, 6, NT>(L, x, T_, out, ws, splits, stream);
    case 8: return gemv_typed<T, 8, NT>(L, x, T_, out, ws, splits, stream);
    case 10: if constexpr (NT <= 4) return gemv_typed<T, 10, NT>(L, x, T_, out, ws, splits, stream);
      break;
    case 12: if constexpr (NT <= 4) return gemv_typed<T, 12, NT>(L, x, T_, out, ws, splits, stream);
      break;
    case 16: if constexpr (NT <= 4) return gemv_typed<T, 16, NT>(L, x, T_, out, ws, splits, stream);
      break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t gemv_by_tokens(const Layer& L, const void* x, int T_, void* out, float* ws,
                           int splits, cudaStream_t stream) {
  switch (tokens_tile(T_)) {
    case 1: return gemv_by_v<T, 1>(L, x, T_, out, ws, splits, stream);
    case 2: return gemv_by_v<T, 2>(L, x, T_, out, ws, splits, stream);
    case 4: return gemv_by_v<T, 4>(L, x, T_, out, ws, splits, stream);
    default: return gemv_by_v<T, 8>(L, x, T_, out, ws, splits, stream);
  }
}

// A codeword of V values (V = 2, 4, 6 or 8) kept as loaded: the widest loads that its
// alignment allows (16 bytes at V = 8, 8 at 4, 4 at 2 and 6), values converted when read.
template <typename T, int V>
struct RawCode {
  using Word = std::conditional_t<V == 8, uint4, std::conditional_t<V == 4, uint2, uint32_t>>;
  static constexpr int kWords = V * sizeof(T) / sizeof(Word);
  __device__ __forceinline__ static void load(const T* p, Word (&w)[kWords]) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const Word*>(p)[i];
  }
  __device__ __forceinline__ static float at(const Word (&w)[kWords], int j) {
    return to_f(reinterpret_cast<const T*>(w)[j]);
  }
};

// Eight adjacent original columns a thread (v <= 8, no outliers, K % 8 == 0): the eight
// codewords' value j of vector-row n go out as one 16-byte store to row n*v + j, where the
// column-a-thread kernel above stores each value alone. Both wait on the codeword gathers from
// L2 (65536-entry codebooks); this one issues an eighth of the stores: the 8B model's weights
// in 9.8 ms against 12.7 (H200, csrc/KERNELS.md session 27).
template <typename T, int V, bool RES>
__global__ void __launch_bounds__(128) dequant8_kernel(Layer L, T* __restrict__ out) {
  const int x0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (x0 >= L.K) return;
  const int rows = (L.N + V - 1) / V, bits = L.b1 + L.b2;
  const T* C = static_cast<const T*>(L.centroids);
  const T* R = static_cast<const T*>(L.res_centroids);
  const uint32_t mask1 = (1u << L.b1) - 1u, mask2 = (1u << L.b2) - 1u;
  float s[8], b[8];
  int grp[8], g[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int x = x0 + c, y = L.inv_perm ? L.inv_perm[x] : x;
    s[c] = L.scale ? to_f(static_cast<const T*>(L.scale)[x]) : 1.f;
    b[c] = L.wbias ? to_f(static_cast<const T*>(L.wbias)[x]) : 0.f;
    grp[c] = y / L.S;
    g[c] = y - grp[c] * L.S;
  }
  using Raw = RawCode<T, V>;
  for (int n = blockIdx.y; n < rows; n += gridDim.y) {
    typename Raw::Word cw[8][Raw::kWords], rw[RES ? 8 : 1][Raw::kWords];  // as loaded
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(L.indices) +
                            (static_cast<size_t>(grp[c]) * rows + n) * L.words;
      const uint32_t m = extract(row, g[c], bits);
      Raw::load(C + (static_cast<size_t>(grp[c]) * L.k + (m & mask1)) * V, cw[c]);
      if constexpr (RES)
        Raw::load(R + (static_cast<size_t>(grp[c]) * L.kr + ((m >> L.b1) & mask2)) * V, rw[c]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int o = n * V + j;
      if (o >= L.N) break;
      uint4 u;
      T* h = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        float w = Raw::at(cw[c], j);
        if constexpr (RES) w += Raw::at(rw[c], j);
        h[c] = from_f<T>(fmaf(w, s[c], b[c]));
      }
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(o) * L.K + x0) = u;
    }
  }
}

// dequant8_kernel where it applies (v <= 8 even, no outliers, K % 8 == 0, out 16-byte aligned).
// One vector-row a thread: four a thread, or 64 registers a thread for more blocks an SM, took
// longer (csrc/KERNELS.md session 27).
template <typename T, int V>
bool dequant8_launch(const Layer& L, T* o, cudaStream_t stream) {
  if (L.P != 0 || L.K % 8 != 0 || reinterpret_cast<uintptr_t>(o) % 16 != 0) return false;
  const int rows = (L.N + V - 1) / V;
  const dim3 grid((L.K / 8 + 127) / 128, rows < 65535 ? rows : 65535);
  if (L.res_centroids != nullptr && L.b2 > 0)
    dequant8_kernel<T, V, true><<<grid, 128, 0, stream>>>(L, o);
  else
    dequant8_kernel<T, V, false><<<grid, 128, 0, stream>>>(L, o);
  return true;
}

template <typename T, int V>
void dequant_launch(const Layer& L, T* o, cudaStream_t stream) {
  if constexpr (V == 2 || V == 4 || V == 6 || V == 8)
    if (dequant8_launch<T, V>(L, o, stream)) return;
  const int rows = (L.N + L.v - 1) / L.v;
  const dim3 grid((L.K + 255) / 256, rows < 65535 ? rows : 65535);
  dequant_kernel<T, V><<<grid, 256, 0, stream>>>(L, o);
}

template <typename T>
cudaError_t dequant_typed(const Layer& L, void* out, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  switch (L.v) {
    case 2: dequant_launch<T, 2>(L, o, stream); break;
    case 4: dequant_launch<T, 4>(L, o, stream); break;
    case 6: dequant_launch<T, 6>(L, o, stream); break;
    case 8: dequant_launch<T, 8>(L, o, stream); break;
    case 12: dequant_launch<T, 12>(L, o, stream); break;
    case 16: dequant_launch<T, 16>(L, o, stream); break;
    default: dequant_launch<T, 0>(L, o, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequant(const Layer& L, void* out, DType dtype, cudaStream_t stream) {
  if (L.v < 1 || L.v > 16 || L.b1 + L.b2 > 32) return cudaErrorInvalidValue;
  if (dtype == DType::kHalf) return dequant_typed<__half>(L, out, stream);
  return dequant_typed<__nv_bfloat16>(L, out, stream);
}

bool gemv_supported(const Layer& L, int T) {
  if (T < 1 || T > 8 || L.P > 0 || L.b1 + L.b2 > 32) return false;
  const int nt = tokens_tile(T);
  switch (L.v) {
    case 2: case 4: case 6: case 8: return true;
    case 10: case 12: case 16: return nt <= 4;
    default: return false;
  }
}

int gemv_splits(const Layer& L, int T, int num_sms) {
  if (wide_ok(L, T)) return wide_splits(L, T, num_sms);
  const int rows = (L.N + L.v - 1) / L.v;
  const int row_blocks = (rows + kWarps - 1) / kWarps;
  const int want = 8 * num_sms;  // enough blocks in flight to hide the gather latency
  int splits = (want + row_blocks - 1) / row_blocks;
  const int max_splits = L.K / 512 > 1 ? L.K / 512 : 1;  // keep >= 512 columns per split
  return splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
}

size_t gemv_workspace_floats(const Layer& L, int T, int splits) {
  return splits > 1 ? static_cast<size_t>(splits) * T * L.N : 0;
}

cudaError_t launch_gemv(const Layer& L, const void* x, int T, void* out, float* workspace,
                        int splits, int num_sms, DType dtype, cudaStream_t stream) {
  if (!gemv_supported(L, T)) return cudaErrorInvalidValue;
  if (wide_ok(L, T)) {
    switch (tokens_tile(T)) {
      case 1: return launch_wide_tile1(L, x, T, out, workspace, splits, num_sms, dtype, stream);
      case 2: return launch_wide_tile2(L, x, T, out, workspace, splits, num_sms, dtype, stream);
      default: return launch_wide_tile4(L, x, T, out, workspace, splits, num_sms, dtype, stream);
    }
  }
  if (dtype == DType::kHalf)
    return gemv_by_tokens<__half>(L, x, T, out, workspace, splits, stream);
  return gemv_by_tokens<__nv_bfloat16>(L, x, T, out, workspace, splits, stream);
}

}  // namespace vptq
