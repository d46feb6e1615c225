// GPTQ layers (engine/formats/gptq.py) at a few tokens: y[t, n] = sum_k x[t, k] * s[g_k, n] *
// (q[k, n] - z[g_k, n]) + bias[n], g_k = g_idx[k], without writing the dense weight.
//
// A thread owns four adjacent output columns (one where N % 4 != 0) and a run of rows (a split
// of K); consecutive threads take consecutive columns, so each packed word row (qweight is
// [K * bits / 32, N]) is read in 16-byte loads, coalesced across the warp. 32 rows are `bits`
// words: code i sits at bit bits * i of them as one little-endian string (3-bit codes 10 and 21
// cross a word). The block stages its rows of x (fp32, through perm where the load sorted the
// rows by group) in shared memory. fp32 sums; each split writes its partial sums, and a second
// kernel adds the splits in order with the bias (deterministic, graph-capturable).
// Two GEMV kernels: gptq_gemv_grouped_kernel where groups are contiguous runs of whole 32-row
// units (three instructions a weight, the scale once a group; 2, 4 and 8 bits), and
// gptq_gemv_kernel for the rest (a group looked up a row, any width).
// More tokens: gptq_dequant_kernel writes column slices of the dense weight for cuBLAS.
// Measurements: csrc/KERNELS.md, sessions 24 and 25.
#include <algorithm>
#include <cstdint>

#include "vptq.h"
#include "vptq_device.cuh"

namespace vptq {
namespace {

constexpr int kGptqThreads = 128;   // output columns a block
constexpr int kGptqMaxRows = 1024;  // rows a split: x (8 tokens) and g_idx in 36 KB of smem
// Blocks an SM, in splits of K. H200, `bench gptq --tokens 1`, Llama-3.1-8B block at 4 bits,
// the first kernel: 2 -> 390 us, 4 -> 309, 8 -> 270, 16 -> 248, 32 -> 240 (fp16 137). The
// grouped kernel (session 25): 2 -> 112, 4 -> 101, 8 -> 95, 16 -> 95, 32 -> 108 at one token,
// 8 -> 194 and 16 -> 212 at 8 tokens; 2-bit 8 -> 90, 16 -> 96.
constexpr int kGptqBlocksPerSm = 8;

// 2**23 + code as a float's bits is exact for codes below 2**23: one OR and one add give
// code - z (exact, z < 2**9) without an int-to-float conversion, a slow instruction.
constexpr float kMagic = 8388608.f;  // 2**23
__device__ __forceinline__ float code_minus(uint32_t code, float magic_z) {
  return __uint_as_float(0x4B000000u | code) - magic_z;
}

// (word & mask) | 0x4B000000 in one LOP3 (left to itself, ptxas spends an AND and an OR).
__device__ __forceinline__ uint32_t mask_into_magic(uint32_t word, uint32_t mask) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(word), "r"(mask), "n"(0x4B000000));
  return d;
}

template <typename S, int BITS, int NT, int COLS>
__global__ void __launch_bounds__(kGptqThreads)
    gptq_gemv_kernel(const S* __restrict__ x, const int32_t* __restrict__ qweight,
                     const int32_t* __restrict__ zeros, const S* __restrict__ scales,
                     const int32_t* __restrict__ g_idx, const int32_t* __restrict__ perm,
                     float* __restrict__ part, int64_t N, int64_t K, int rows_per_split,
                     int64_t t0, int64_t tokens) {
  extern __shared__ float smem[];
  float* xs = smem;                                             // [rows_per_split][NT]
  int* gs = reinterpret_cast<int*>(smem + NT * rows_per_split);  // [rows_per_split]
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int rows = static_cast<int>(K - k0 < rows_per_split ? K - k0 : rows_per_split);
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    gs[i] = g_idx[k0 + i];
    const int64_t k = perm != nullptr ? perm[k0 + i] : k0 + i;  // rows sorted by group
#pragma unroll
    for (int t = 0; t < NT; ++t) xs[i * NT + t] = to_f(x[t * K + k]);
  }
  __syncthreads();
  // COLS adjacent columns a thread (4: one 16-byte load a word row, N % 4 == 0)
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kGptqThreads + threadIdx.x) * COLS;
  if (n >= N) return;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  float acc[NT][COLS];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[t][c] = 0.f;
  int group = -1;
  float s[COLS], z[COLS];  // z: 2**23 + the zero point (code_minus)
  for (int u = 0; u < rows; u += 32) {  // rows is a multiple of 32 (K % 32 == 0)
    const int64_t word_row = (k0 + u) / 32 * BITS;
    uint32_t w[BITS][COLS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      const int32_t* src = qweight + (word_row + j) * N + n;
      if constexpr (COLS == 4) {
        const int4 v = *reinterpret_cast<const int4*>(src);
        w[j][0] = v.x, w[j][1] = v.y, w[j][2] = v.z, w[j][3] = v.w;
      } else {
#pragma unroll
        for (int c = 0; c < COLS; ++c) w[j][c] = static_cast<uint32_t>(src[c]);
      }
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int bit = BITS * i, word = bit >> 5, off = bit & 31;
      const int g = gs[u + i];
      if (g != group) {  // the same for every thread of the block: no divergence
        group = g;
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          s[c] = to_f(scales[static_cast<int64_t>(g) * N + n + c]);
          z[c] = kMagic + static_cast<float>(zeros[static_cast<int64_t>(g) * N + n + c]);
        }
      }
      float wv[COLS];
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        uint32_t code = w[word][c] >> off;
        if (off + BITS > 32) code |= w[word + 1][c] << (32 - off);
        wv[c] = s[c] * code_minus(code & kMask, z[c]);
      }
      // the row's x of every token in NT / 4 16-byte loads (a broadcast: one address a warp)
      float xv[NT];
      if constexpr (NT % 4 == 0) {
#pragma unroll
        for (int t = 0; t < NT; t += 4) {
          const float4 v = *reinterpret_cast<const float4*>(xs + (u + i) * NT + t);
          xv[t] = v.x, xv[t + 1] = v.y, xv[t + 2] = v.z, xv[t + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xs[(u + i) * NT + t];
      }
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[t][c] = fmaf(xv[t], wv[c], acc[t][c]);
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int c = 0; c < COLS; ++c) part[(blockIdx.y * tokens + t0 + t) * N + n + c] = acc[t][c];
}

// The same sums where a group's rows are contiguous (g = k / G, G a multiple of 32: act-order
// layers get there by a load-time row sort, perm giving each sorted row's x), at 2, 4 and 8
// bits with four columns a thread. Each weight costs three instructions: one LOP3 puts code p
// of a half-word (still shifted by BITS * p) into the mantissa of 2**23, one FADD takes off
// 2**23 + z * 2**(BITS * p) (so (q - z) * 2**(BITS * p), exact), one FFMA multiplies it by x
// staged times 2**-(BITS * p). The scale multiplies each group's sum once, not each weight.
template <typename S, int BITS, int NT>
__global__ void __launch_bounds__(kGptqThreads)
    gptq_gemv_grouped_kernel(const S* __restrict__ x, const int32_t* __restrict__ qweight,
                             const int32_t* __restrict__ zeros, const S* __restrict__ scales,
                             const int32_t* __restrict__ perm, float* __restrict__ part,
                             int64_t N, int64_t K, int G, int rows_per_split, int64_t t0,
                             int64_t tokens) {
  constexpr int P = 16 / BITS;  // codes in half a word
  constexpr int R = 32 / BITS;  // rows a word
  constexpr uint32_t kMask = (1u << BITS) - 1;
  extern __shared__ float4 grouped_smem[];
  float* xs = reinterpret_cast<float*>(grouped_smem);  // [NT][rows_per_split]
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int rows = static_cast<int>(K - k0 < rows_per_split ? K - k0 : rows_per_split);
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    const int64_t k = perm != nullptr ? perm[k0 + i] : k0 + i;
    const float f = __uint_as_float(static_cast<uint32_t>(127 - BITS * (i % P)) << 23);
#pragma unroll
    for (int t = 0; t < NT; ++t) xs[t * rows_per_split + i] = to_f(x[t * K + k]) * f;
  }
  __syncthreads();
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kGptqThreads + threadIdx.x) * 4;
  if (n >= N) return;
  float acc[NT][4], gacc[NT][4], s[4], mz[4][P];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[t][c] = gacc[t][c] = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) s[c] = 0.f;
  // K < 2**31 rows (gptq_dequant's limit is far below): 32-bit row numbers; a division only
  // where a group starts
  int next = static_cast<int>(k0);  // the row where the next group starts
  const int32_t* wp = qweight + k0 / 32 * BITS * N + n;  // this run's first word row
  for (int u = 0; u < rows; u += 32, wp += BITS * N) {
    if (static_cast<int>(k0) + u >= next) {  // the last group's sums scaled; this one's zeros
      const int g = (static_cast<int>(k0) + u) / G;
      next = (g + 1) * G;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t][c] = fmaf(s[c], gacc[t][c], acc[t][c]), gacc[t][c] = 0.f;
        s[c] = to_f(scales[static_cast<int64_t>(g) * N + n + c]);
        const float z = static_cast<float>(zeros[static_cast<int64_t>(g) * N + n + c]);
#pragma unroll
        for (int p = 0; p < P; ++p) mz[c][p] = kMagic + z * static_cast<float>(1 << (BITS * p));
      }
    }
    uint32_t w[BITS][4];
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      const int4 v = *reinterpret_cast<const int4*>(wp + j * N);
      w[j][0] = v.x, w[j][1] = v.y, w[j][2] = v.z, w[j][3] = v.w;
    }
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      float xv[NT][R];  // the R rows of word j, R / 4 broadcast 16-byte loads a token
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int q = 0; q < R; q += 4) {
          const float4 v = *reinterpret_cast<const float4*>(xs + t * rows_per_split + u + j * R + q);
          xv[t][q] = v.x, xv[t][q + 1] = v.y, xv[t][q + 2] = v.z, xv[t][q + 3] = v.w;
        }
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t half = h ? w[j][c] >> 16 : w[j][c];
#pragma unroll
          for (int p = 0; p < P; ++p) {
            const float v = __uint_as_float(mask_into_magic(half, kMask << (BITS * p))) - mz[c][p];
#pragma unroll
            for (int t = 0; t < NT; ++t) gacc[t][c] = fmaf(xv[t][h * P + p], v, gacc[t][c]);
          }
        }
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      part[(blockIdx.y * tokens + t0 + t) * N + n + c] = fmaf(s[c], gacc[t][c], acc[t][c]);
}

template <typename S>
__global__ void gptq_sum_kernel(const float* __restrict__ part, const S* __restrict__ bias,
                                S* __restrict__ out, int64_t N, int64_t tokens, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * N) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += part[s * tokens * N + i];
  if (bias != nullptr) v += to_f(bias[i % N]);
  out[i] = from_f<S>(v);
}

// Columns a thread: 4 (16-byte loads) where N allows.
int gptq_cols(int64_t N) { return N % 4 == 0 ? 4 : 1; }

// Prefill: columns n0 .. n0 + C of the dense weight, out [K, C] row-major (so that cuBLAS takes
// it as it is). A thread owns COLS adjacent columns of one run of 32 rows (blockIdx.y): the
// same 16-byte word loads as the GEMV, and each row's COLS values stored together, a warp's
// stores of a row contiguous. s * (q - z) is exact in fp32 (an 11-bit or 8-bit mantissa times
// a whole number below 2**9), so its one rounding to S equals engine/formats/gptq.py dequant.
template <typename S, int COLS>
struct alignas(sizeof(S) * COLS) Pack {
  S v[COLS];
};

template <typename S, int BITS, int COLS>
__global__ void __launch_bounds__(kGptqThreads)
    gptq_dequant_kernel(const int32_t* __restrict__ qweight, const int32_t* __restrict__ zeros,
                        const S* __restrict__ scales, const int32_t* __restrict__ g_idx,
                        const int32_t* __restrict__ perm, S* __restrict__ out, int64_t N,
                        int64_t n0, int64_t C) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kGptqThreads + threadIdx.x) * COLS;
  if (c >= C) return;
  const int64_t n = n0 + c, k0 = static_cast<int64_t>(blockIdx.y) * 32;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  uint32_t w[BITS][COLS];
#pragma unroll
  for (int j = 0; j < BITS; ++j) {
    const int32_t* src = qweight + (blockIdx.y * static_cast<int64_t>(BITS) + j) * N + n;
    if constexpr (COLS == 4) {
      const int4 v = *reinterpret_cast<const int4*>(src);
      w[j][0] = v.x, w[j][1] = v.y, w[j][2] = v.z, w[j][3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < COLS; ++i) w[j][i] = static_cast<uint32_t>(src[i]);
    }
  }
  int group = -1;
  float s[COLS], z[COLS];  // z: 2**23 + the zero point (code_minus)
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int bit = BITS * i, word = bit >> 5, off = bit & 31;
    const int g = g_idx[k0 + i];
    if (g != group) {
      group = g;
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
        s[j] = to_f(scales[static_cast<int64_t>(g) * N + n + j]);
        z[j] = kMagic + static_cast<float>(zeros[static_cast<int64_t>(g) * N + n + j]);
      }
    }
    Pack<S, COLS> row;
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
      uint32_t code = w[word][j] >> off;
      if (off + BITS > 32) code |= w[word + 1][j] << (32 - off);
      row.v[j] = from_f<S>(s[j] * code_minus(code & kMask, z[j]));
    }
    const int64_t k = perm != nullptr ? perm[k0 + i] : k0 + i;  // sorted row -> its own
    *reinterpret_cast<Pack<S, COLS>*>(out + k * C + c) = row;
  }
}

template <typename S, int BITS>
cudaError_t launch_dequant_bits(const GptqDequantArgs& a, cudaStream_t stream) {
  const dim3 grid4(static_cast<unsigned>((a.cols + 4 * kGptqThreads - 1) / (4 * kGptqThreads)),
                   static_cast<unsigned>(a.K / 32));
  S* out = static_cast<S*>(a.out);
  const S* scales = static_cast<const S*>(a.scales);
  if (a.N % 4 == 0 && a.n0 % 4 == 0 && a.cols % 4 == 0) {
    gptq_dequant_kernel<S, BITS, 4><<<grid4, kGptqThreads, 0, stream>>>(
        a.qweight, a.zeros, scales, a.g_idx, a.perm, out, a.N, a.n0, a.cols);
  } else {
    const dim3 grid(static_cast<unsigned>((a.cols + kGptqThreads - 1) / kGptqThreads), grid4.y);
    gptq_dequant_kernel<S, BITS, 1><<<grid, kGptqThreads, 0, stream>>>(
        a.qweight, a.zeros, scales, a.g_idx, a.perm, out, a.N, a.n0, a.cols);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dequant_dtype(const GptqDequantArgs& a, cudaStream_t stream) {
  switch (a.bits) {
    case 2: return launch_dequant_bits<S, 2>(a, stream);
    case 3: return launch_dequant_bits<S, 3>(a, stream);
    case 4: return launch_dequant_bits<S, 4>(a, stream);
    case 8: return launch_dequant_bits<S, 8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename S, int BITS, int NT, int COLS>
cudaError_t launch_cols(const GptqArgs& a, int64_t t0, int splits, int rows, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(NT + 1) * rows * sizeof(float);
  const int64_t per_block = static_cast<int64_t>(kGptqThreads) * COLS;
  const dim3 grid(static_cast<unsigned>((a.N + per_block - 1) / per_block),
                  static_cast<unsigned>(splits));
  gptq_gemv_kernel<S, BITS, NT, COLS><<<grid, kGptqThreads, smem, stream>>>(
      static_cast<const S*>(a.x) + t0 * a.K, a.qweight, a.zeros,
      static_cast<const S*>(a.scales), a.g_idx, a.perm, a.part, a.N, a.K, rows, t0, a.tokens);
  return cudaGetLastError();
}

// Whether the grouped kernel takes the layer: contiguous groups of whole runs of 32 rows,
// a code width that halves of words hold, four columns a thread.
bool grouped_ok(const GptqArgs& a) {
  return a.group_size > 0 && a.group_size % 32 == 0 && a.bits != 3 && gptq_cols(a.N) == 4;
}

template <typename S, int BITS, int NT>
cudaError_t launch_tile(const GptqArgs& a, int64_t t0, int splits, int rows, cudaStream_t stream) {
  if constexpr (BITS != 3) {
    if (grouped_ok(a)) {
      const size_t smem = static_cast<size_t>(NT) * rows * sizeof(float);
      const dim3 grid(static_cast<unsigned>((a.N + 4 * kGptqThreads - 1) / (4 * kGptqThreads)),
                      static_cast<unsigned>(splits));
      gptq_gemv_grouped_kernel<S, BITS, NT><<<grid, kGptqThreads, smem, stream>>>(
          static_cast<const S*>(a.x) + t0 * a.K, a.qweight, a.zeros,
          static_cast<const S*>(a.scales), a.perm, a.part, a.N, a.K, a.group_size, rows, t0,
          a.tokens);
      return cudaGetLastError();
    }
  }
  if (gptq_cols(a.N) == 4) return launch_cols<S, BITS, NT, 4>(a, t0, splits, rows, stream);
  return launch_cols<S, BITS, NT, 1>(a, t0, splits, rows, stream);
}

template <typename S, int BITS>
cudaError_t launch_bits(const GptqArgs& a, int splits, int rows, cudaStream_t stream) {
  for (int64_t t0 = 0; t0 < a.tokens;) {
    const int64_t left = a.tokens - t0;
    cudaError_t err;
    int nt;
    if (left >= 8) {
      err = launch_tile<S, BITS, 8>(a, t0, splits, rows, stream), nt = 8;
    } else if (left >= 4) {
      err = launch_tile<S, BITS, 4>(a, t0, splits, rows, stream), nt = 4;
    } else if (left >= 2) {
      err = launch_tile<S, BITS, 2>(a, t0, splits, rows, stream), nt = 2;
    } else {
      err = launch_tile<S, BITS, 1>(a, t0, splits, rows, stream), nt = 1;
    }
    if (err != cudaSuccess) return err;
    t0 += nt;
  }
  const int64_t n = a.tokens * a.N;
  const int threads = 256;
  gptq_sum_kernel<S><<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
      a.part, static_cast<const S*>(a.bias), static_cast<S*>(a.out), a.N, a.tokens, splits);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dtype(const GptqArgs& a, int splits, int rows, cudaStream_t stream) {
  switch (a.bits) {
    case 2: return launch_bits<S, 2>(a, splits, rows, stream);
    case 3: return launch_bits<S, 3>(a, splits, rows, stream);
    case 4: return launch_bits<S, 4>(a, splits, rows, stream);
    case 8: return launch_bits<S, 8>(a, splits, rows, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Rows a split: about kGptqBlocksPerSm blocks an SM over the column blocks, whole runs of 32,
// at most kGptqMaxRows.
int gptq_rows(int64_t N, int64_t K, int num_sms) {
  const int64_t per_block = static_cast<int64_t>(kGptqThreads) * gptq_cols(N);
  const int64_t col_blocks = (N + per_block - 1) / per_block;
  const int64_t want =
      std::max<int64_t>(1, (kGptqBlocksPerSm * num_sms + col_blocks - 1) / col_blocks);
  int64_t rows = (K + want - 1) / want;
  rows = std::min<int64_t>((rows + 31) / 32 * 32, kGptqMaxRows);
  return static_cast<int>(std::max<int64_t>(rows, 32));
}

}  // namespace

int gptq_splits(int64_t N, int64_t K, int num_sms) {
  const int rows = gptq_rows(N, K, num_sms);
  return static_cast<int>((K + rows - 1) / rows);
}

cudaError_t launch_gptq_dequant(const GptqDequantArgs& a, cudaStream_t stream) {
  if (a.K % 32 != 0 || a.K / 32 > 65535 || a.n0 < 0 || a.cols < 1 || a.n0 + a.cols > a.N)
    return cudaErrorInvalidValue;
  if (a.dtype == DType::kHalf) return launch_dequant_dtype<__half>(a, stream);
  return launch_dequant_dtype<__nv_bfloat16>(a, stream);
}

cudaError_t launch_gptq_gemv(const GptqArgs& a, int num_sms, cudaStream_t stream) {
  if (a.K % 32 != 0 || a.tokens < 1) return cudaErrorInvalidValue;
  const int rows = gptq_rows(a.N, a.K, num_sms);
  const int splits = static_cast<int>((a.K + rows - 1) / rows);
  if (a.dtype == DType::kHalf) return launch_dtype<__half>(a, splits, rows, stream);
  return launch_dtype<__nv_bfloat16>(a, splits, rows, stream);
}

}  // namespace vptq
