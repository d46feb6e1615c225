// The plain GEMVs' shared ends (the block's dot(x, weight_bias), a row's warp sum and write,
// the sum over splits of K) and the wide GEMV for the community schemes' index fields, whose
// instances each token tile compiles in its own translation unit (vptq_wide_<tile>.cu) so that
// a build compiles them in parallel. gemv_kernel, the dispatch and the choice of splits:
// vptq_kernels.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "vptq.h"
#include "vptq_device.cuh"

namespace vptq {
namespace {

// xb[t] summed over the block's threads (each thread's share of dot(x, weight_bias) over the
// split's columns), in every thread; part: WARPS x NT floats of shared memory.
template <int NT, int WARPS>
__device__ __forceinline__ void block_sum(float (&xb)[NT], float (*part)[NT]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) xb[t] += __shfl_xor_sync(0xffffffffu, xb[t], d);
    if (lane == 0) part[warp][t] = xb[t];
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    xb[t] = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) xb[t] += part[w][t];
  }
}

// Vector-row n's sums across the warp (acc: each lane's share) plus xb[t]: lane j writes
// output n * V + j of each token, with the bias into out where K is not split, else into split
// blockIdx.y's workspace for split_sum_kernel.
template <typename T, int V, int NT>
__device__ __forceinline__ void finish_row(float (&acc)[NT][V], const float (&xb)[NT],
                                           const Layer& L, int n, int ntok, T* out, float* ws,
                                           int splits) {
  const int lane = threadIdx.x & 31;
  const T* bias = static_cast<const T*>(L.bias);
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j)
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) acc[t][j] += __shfl_xor_sync(0xffffffffu, acc[t][j], d);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int o = n * V + j;
    if (lane != j || o >= L.N) continue;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= ntok) break;
      const float total = acc[t][j] + xb[t];
      if (splits == 1)
        out[static_cast<size_t>(t) * L.N + o] = from_f<T>(bias ? total + to_f(bias[o]) : total);
      else
        ws[(static_cast<size_t>(blockIdx.y) * ntok + t) * L.N + o] = total;
    }
  }
}

template <typename T>
__global__ void split_sum_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                 int splits, int ntok, int N, T* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;  // over ntok * N
  if (i >= ntok * N) return;
  float total = bias ? to_f(bias[i % N]) : 0.f;
  for (int s = 0; s < splits; ++s) total += ws[static_cast<size_t>(s) * ntok * N + i];
  out[i] = from_f<T>(total);
}

// After a GEMV launch: its error, else where K was split, out = bias + the splits' partial sums.
template <typename T>
cudaError_t sum_splits(const Layer& L, int T_, void* out, const float* ws, int splits,
                       cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int total = T_ * L.N;
  split_sum_kernel<T><<<(total + 255) / 256, 256, 0, stream>>>(
      ws, static_cast<const T*>(L.bias), splits, T_, L.N, static_cast<T*>(out));
  return cudaGetLastError();
}

// The wide GEMV: the plain layout's fast path where a row's 8 adjacent index fields (an octet)
// fill whole 32-bit words: fields of BITS = 16 (one codebook of up to 65536 codewords), 24, 28 or
// 32 bits (main and residual codebook: b1 + b2), v = 8, 12 or 16. These are the community
// schemes; it is their decode path where the sliced layout does not fit in memory (most layers
// of a 70B model within 22 GiB). gemv_kernel waited for a lane's index loads and then for its
// codeword gathers, 8 at a time, with a block per 4 rows re-staging xhat: latency-bound at 45%
// of L2 throughput. Here a lane takes an octet of a row at a time: its fields are one to seven
// vector loads, fetched a round ahead across rows; up to 16 codewords' gathers are in flight at
// once; and the blocks stay resident, each staging xhat for its split of K once and walking rows
// n = blockIdx.x * 8 + warp, + gridDim.x * 8, ... (90% of L2 throughput on 70B gate, ncu).
constexpr int kWideWarps = 8;
constexpr int kWideStageBytes = 48 * 1024;  // xhat staging per block (no opt-in above 48 KB)
constexpr int kWideBlocksPerSm = 2;

template <int V, int NT, int BITS>
struct Wide {
  static constexpr bool kRes = BITS > 16;          // a residual codebook (b1 <= 16)
  static constexpr int kFieldWords = BITS / 4;     // 32-bit words of an octet's fields
  static constexpr int kCodeWords = V / 2;         // 32-bit words of a codeword
  static constexpr int kColWords = kCodeWords * (kRes ? 2 : 1);  // gathered per column
  // 32-bit words of codewords a lane has in flight: 16 16-byte loads at one token, fewer where
  // the sums take more registers (no spills at 128 registers)
  static constexpr int kBudget = NT == 1 ? 64 : NT * V <= 16 ? 32 : 16;
  static constexpr int kOctets = kBudget / kColWords >= 16 ? 2 : 1;  // octets per round
  static constexpr int kCols = 8 * kOctets;                          // columns per round
  static constexpr int kPiece = kBudget / kColWords < 1 ? 1
                                : kBudget / kColWords < kCols ? kBudget / kColWords
                                                              : kCols;  // gathered together
};

// Columns of each split: a multiple of 8 (whole octets), the last split taking the rest.
__host__ __device__ inline int wide_per_split(int K, int splits) {
  return ((K + splits - 1) / splits + 7) / 8 * 8;
}

// N 32-bit words from p with the widest loads its alignment (a multiple of N * 4 bytes' largest
// power-of-two divisor up to 16) allows.
template <int N>
__device__ __forceinline__ void load_words(const uint32_t* p, uint32_t* w) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = u.x, w[2 * i + 1] = u.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __ldg(p + i);
  }
}

// The index fields of one round of a lane: octet o of the round is octet (r * kOctets + o) * 32
// + lane of the split, in vector-row n; zero where that is past the split or the rows.
template <int V, int NT, int BITS>
__device__ __forceinline__ void wide_fields(
    const Layer& L, int rows, int y0, int noct, int n, int r, int lane,
    uint32_t (&f)[Wide<V, NT, BITS>::kOctets][Wide<V, NT, BITS>::kFieldWords]) {
  using W = Wide<V, NT, BITS>;
#pragma unroll
  for (int o = 0; o < W::kOctets; ++o) {
    const int oct = (r * W::kOctets + o) * 32 + lane;
#pragma unroll
    for (int i = 0; i < W::kFieldWords; ++i) f[o][i] = 0;
    if (n >= rows || oct >= noct) continue;
    const int y = y0 + 8 * oct, c = L.G == 1 ? 0 : y / L.S;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(L.indices) +
                        (static_cast<size_t>(c) * rows + n) * L.words +
                        (y - c * L.S) / 8 * W::kFieldWords;
    load_words<W::kFieldWords>(p, f[o]);
  }
}

// Field q (0..7) of an octet: bits q * BITS .. q * BITS + BITS - 1 of its words.
template <int BITS>
__device__ __forceinline__ uint32_t wide_field(const uint32_t* f, int q) {
  const int bit = q * BITS, w = bit / 32, off = bit % 32;
  uint32_t v = f[w] >> off;
  if (off + BITS > 32) v |= f[w + 1] << (32 - off);
  return BITS == 32 ? v : v & ((1u << BITS) - 1u);
}

template <typename T, int V, int NT, int BITS>
__global__ void __launch_bounds__(kWideWarps * 32, kWideBlocksPerSm)
    gemv_wide_kernel(Layer L, const T* __restrict__ x, int ntok, T* __restrict__ out,
                     float* __restrict__ ws, int splits) {
  using W = Wide<V, NT, BITS>;
  extern __shared__ __align__(16) float xs[];  // [NT][cols]: xhat of this split's columns
  __shared__ float xb_part[kWideWarps][NT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = (L.N + V - 1) / V;
  const int per_split = wide_per_split(L.K, splits);
  const int y0 = blockIdx.y * per_split, cols = max(0, min(L.K - y0, per_split));
  const int noct = cols / 8, nrounds = max(1, (noct + 32 * W::kOctets - 1) / (32 * W::kOctets));
  const int stride = gridDim.x * kWideWarps;
  const uint32_t mask1 = (1u << L.b1) - 1u, mask2 = (1u << L.b2) - 1u;  // b1, b2 <= 16
  const T* C = static_cast<const T*>(L.centroids);
  const T* R = static_cast<const T*>(L.res_centroids);

  // The first round's index fields do not depend on x: they load while xhat is staged.
  int n = blockIdx.x * kWideWarps + warp;
  uint32_t next[W::kOctets][W::kFieldWords];
  wide_fields<V, NT, BITS>(L, rows, y0, noct, n, 0, lane, next);

  // xhat = x[perm] * scale[perm] for the split's columns, 4 columns a thread with their loads
  // issued together; this thread's share of dot(x, weight_bias) on the way.
  const T* scale = static_cast<const T*>(L.scale);
  const T* wbias = static_cast<const T*>(L.wbias);
  float xb[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) xb[t] = 0.f;
  for (int i0 = threadIdx.x; i0 < cols; i0 += 4 * blockDim.x) {
    int p[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = min(i0 + q * static_cast<int>(blockDim.x), cols - 1);
      p[q] = L.perm ? __ldg(L.perm + y0 + i) : y0 + i;
    }
    float sc[4], b[4], xv[4][NT];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      sc[q] = scale ? to_f(scale[p[q]]) : 1.f;
      b[q] = wbias ? to_f(wbias[p[q]]) : 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t)
        xv[q][t] = t < ntok ? to_f(x[static_cast<size_t>(t) * L.K + p[q]]) : 0.f;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + q * static_cast<int>(blockDim.x);
      if (i >= cols) continue;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        xs[t * cols + i] = xv[q][t] * sc[q];
        xb[t] = fmaf(xv[q][t], b[q], xb[t]);
      }
    }
  }
  block_sum<NT, kWideWarps>(xb, xb_part);

  for (; n < rows; n += stride) {
    float acc[NT][V];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[t][j] = 0.f;
    for (int r = 0; r < nrounds; ++r) {
      uint32_t f[W::kOctets][W::kFieldWords];
#pragma unroll
      for (int o = 0; o < W::kOctets; ++o)
#pragma unroll
        for (int i = 0; i < W::kFieldWords; ++i) f[o][i] = next[o][i];
      // the next round's fields: this row's next round, else the warp's next row's first
      if (r + 1 < nrounds)
        wide_fields<V, NT, BITS>(L, rows, y0, noct, n, r + 1, lane, next);
      else
        wide_fields<V, NT, BITS>(L, rows, y0, noct, n + stride, 0, lane, next);
      // xhat of the round's octets: two 16-byte shared loads per octet and token (a warp reads
      // 1 KB in a row, no bank conflicts); zero past the split
      float xr[W::kOctets][NT][8];
#pragma unroll
      for (int o = 0; o < W::kOctets; ++o) {
        const int oct = (r * W::kOctets + o) * 32 + lane;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
          if (oct < noct) {
            a = *reinterpret_cast<const float4*>(xs + t * cols + 8 * oct);
            b = *reinterpret_cast<const float4*>(xs + t * cols + 8 * oct + 4);
          }
          xr[o][t][0] = a.x, xr[o][t][1] = a.y, xr[o][t][2] = a.z, xr[o][t][3] = a.w;
          xr[o][t][4] = b.x, xr[o][t][5] = b.y, xr[o][t][6] = b.z, xr[o][t][7] = b.w;
        }
      }
#pragma unroll
      for (int c0 = 0; c0 < W::kCols; c0 += W::kPiece) {
        // the piece's codewords (and residual codewords), all their loads in flight at once;
        // zero past the split, where xhat is zero too
        uint32_t cw[W::kPiece][W::kColWords];
#pragma unroll
        for (int j = 0; j < W::kPiece; ++j) {
          if (c0 + j >= W::kCols) break;
          const int o = (c0 + j) / 8, q = (c0 + j) % 8;
          const int oct = (r * W::kOctets + o) * 32 + lane;
          const int y = y0 + 8 * oct, c = L.G == 1 ? 0 : y / L.S;
          const uint32_t m = wide_field<BITS>(f[o], q);
          const T* pc = C + (static_cast<size_t>(c) * L.k + (m & mask1)) * V;
#pragma unroll
          for (int i = 0; i < W::kColWords; ++i) cw[j][i] = 0;
          if (oct < noct) {
            load_words<W::kCodeWords>(reinterpret_cast<const uint32_t*>(pc), cw[j]);
            if constexpr (W::kRes) {
              const T* pr = R + (static_cast<size_t>(c) * L.kr + ((m >> L.b1) & mask2)) * V;
              load_words<W::kCodeWords>(reinterpret_cast<const uint32_t*>(pr),
                                        cw[j] + W::kCodeWords);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < W::kPiece; ++j) {
          if (c0 + j >= W::kCols) break;
          const int o = (c0 + j) / 8, q = (c0 + j) % 8;
          const T* e = reinterpret_cast<const T*>(cw[j]);
          float w[V];
#pragma unroll
          for (int i = 0; i < V; ++i) w[i] = W::kRes ? to_f(e[i]) + to_f(e[V + i]) : to_f(e[i]);
#pragma unroll
          for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[t][i] = fmaf(xr[o][t][q], w[i], acc[t][i]);
        }
      }
    }
    finish_row<T, V, NT>(acc, xb, L, n, ntok, out, ws, splits);
  }
}

// Blocks per split of a wide launch: one resident wave in all (kWideBlocksPerSm per SM), no more
// than there are rows for.
int wide_blocks(const Layer& L, int splits, int num_sms) {
  const int rows = (L.N + L.v - 1) / L.v, want = (kWideBlocksPerSm * num_sms + splits - 1) / splits;
  const int most = (rows + kWideWarps - 1) / kWideWarps;
  return want < most ? want : most;
}

template <typename T, int V, int NT, int BITS>
cudaError_t wide_typed(const Layer& L, const void* x, int T_, void* out, float* ws, int splits,
                       int num_sms, cudaStream_t stream) {
  const dim3 grid(wide_blocks(L, splits, num_sms), splits);
  const size_t smem = static_cast<size_t>(wide_per_split(L.K, splits)) * NT * sizeof(float);
  gemv_wide_kernel<T, V, NT, BITS><<<grid, kWideWarps * 32, smem, stream>>>(
      L, static_cast<const T*>(x), T_, static_cast<T*>(out), ws, splits);
  return sum_splits<T>(L, T_, out, ws, splits, stream);
}

template <typename T, int V, int NT>
cudaError_t wide_by_bits(const Layer& L, const void* x, int T_, void* out, float* ws, int splits,
                         int num_sms, cudaStream_t stream) {
  switch (L.b1 + L.b2) {
    case 16: return wide_typed<T, V, NT, 16>(L, x, T_, out, ws, splits, num_sms, stream);
    case 24: return wide_typed<T, V, NT, 24>(L, x, T_, out, ws, splits, num_sms, stream);
    case 28: return wide_typed<T, V, NT, 28>(L, x, T_, out, ws, splits, num_sms, stream);
    default: return wide_typed<T, V, NT, 32>(L, x, T_, out, ws, splits, num_sms, stream);
  }
}

// The wide GEMV's instances for a tile of NT tokens: v = 8 at every tile, 12 and 16 up to 2
// tokens (what wide_ok admits).
template <typename T, int NT>
cudaError_t wide_by_v(const Layer& L, const void* x, int T_, void* out, float* ws, int splits,
                      int num_sms, cudaStream_t stream) {
  if constexpr (NT <= 2) {
    if (L.v == 16) return wide_by_bits<T, 16, NT>(L, x, T_, out, ws, splits, num_sms, stream);
    if (L.v == 12) return wide_by_bits<T, 12, NT>(L, x, T_, out, ws, splits, num_sms, stream);
  }
  if (L.v == 8) return wide_by_bits<T, 8, NT>(L, x, T_, out, ws, splits, num_sms, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

// The wide GEMV's launches for a tile of 1, 2 or 4 tokens, fp16 or bf16 (vptq_wide_<tile>.cu
// defines each with VPTQ_WIDE_TILE; launch_gemv in vptq_kernels.cu dispatches to them).
#define VPTQ_WIDE_TILE_SIGNATURE(NT)                                                           \
  cudaError_t launch_wide_tile##NT(const Layer& L, const void* x, int T, void* out, float* ws, \
                                   int splits, int num_sms, DType dtype, cudaStream_t stream)
#define VPTQ_WIDE_TILE(NT)                                                                     \
  VPTQ_WIDE_TILE_SIGNATURE(NT) {                                                               \
    if (dtype == DType::kHalf)                                                                 \
      return wide_by_v<__half, NT>(L, x, T, out, ws, splits, num_sms, stream);                 \
    return wide_by_v<__nv_bfloat16, NT>(L, x, T, out, ws, splits, num_sms, stream);            \
  }
VPTQ_WIDE_TILE_SIGNATURE(1);
VPTQ_WIDE_TILE_SIGNATURE(2);
VPTQ_WIDE_TILE_SIGNATURE(4);

}  // namespace vptq
