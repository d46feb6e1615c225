// The sliced lookup-GEMV: y = x W^T + bias for 1..8 tokens (v x tokens <= 32) for layers whose
// codebooks do not fit in shared memory (the 65536-entry codebooks of the community models).
//
// Why: gathering a 16-byte codeword per index from a 1 MiB codebook in L2 moves a 32-byte
// sector per 8 weights, more bytes than cuBLAS reads for the fp16 weight (csrc/KERNELS.md).
// So engine/ops/sliced.py regroups a layer's lookups once, at load time, by codebook slice:
// block (row block b, part = (chunk c, slice s)) copies slice s of the codebooks (64 KB) into
// shared memory and serves every lookup of its rows in column chunk c that falls into that
// slice from there. An entry is 32 bits, (column within its chunk of 4096 to 8192 columns << 16)
// | codeword within the slice (a chunk is what shared memory holds of xhat, engine/ops/sliced.py
// chunk_width); a segment is the entries of one (slice, chunk, vector-row), in round-robin order
// over the shared-memory banks of their codewords and padded to a multiple of 16 with entries
// of a zero column; perm is folded into the columns.
//
// Per block: the codebook slice (and a small residual codebook, which every block holds whole,
// once per lane of a wavefront where that fits: vptq.h res_copies) goes to shared memory; xhat =
// x * weight_scale for the chunk's columns is staged in fp32; each warp takes pairs of
// vector-rows, a half-warp a row, and walks the two rows' segments 16 entries at a time, one per
// lane, in batches of kBatch (the next batch fetched while one is worked on; at v =
// 16 without a small residual codebook a warp takes one row, a lane pair on each entry, kHalves);
// lanes gather xhat and the codeword from shared memory and accumulate v x tokens sums in fp32;
// each half-warp's sum goes to its row's accumulator in the block's shared memory (two rows a warp
// halve the shuffles of these sums, a fifth of the loop's instructions with one row a warp:
// csrc/KERNELS.md session 16). Then each block writes its part's sums (slice 0's with dot(x, b)
// over the chunk added), and the last block of a row block to finish (a ticket counter) adds bias
// and the parts in order and writes the output: deterministic, one launch, no host synchronisation.
// In the decode step the launch stops short of that (SlicedGroup::partial, vptq.h Parts): each
// block's sums are a term of the output, the blocks of part 0 also write term 0, the bias, and the
// kernel that reads the output (add_rms_norm, rope_kv, silu_mul, vptq_decode.cu) adds the terms in
// the same order, so the GEMV ends when its last lookups do, with no fence, ticket or lone block at
// the end. A layer of several chunks has a block per chunk, not a block walking the chunks behind a
// barrier at each chunk end (csrc/KERNELS.md session 16). One launch may serve up to kMaxGroup
// layers that read the same x (q, k, v): their blocks share one wave, and each layer's sums are
// those it gets alone.
#pragma once

#include <cuda_pipeline.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "vptq.h"
#include "vptq_device.cuh"

namespace vptq {
namespace {

constexpr int kWarpsS = kSlicedThreads / 32;
// A warp works on two vector-rows at once, lanes 0-15 on one and 16-31 on the other; segments
// are padded to multiples of kRowLanes (engine/memory.py PAD_TO).
constexpr int kRowLanes = 16;

__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) & ~size_t{15}; }

struct SmemPlan {
  size_t cb, res, xs, acc, total;
};

// copies: res_copies(L.v, L.res_cw) (the kernel passes a constant 1 where it has no residual).
__host__ __device__ SmemPlan plan(const SlicedLayer& L, int nt, int copies) {
  SmemPlan p;
  p.cb = 0;
  p.res = align16(static_cast<size_t>(L.slice_cw) * L.v * 2);
  p.xs = p.res + align16(static_cast<size_t>(L.res_cw) * copies * L.v * 2);
  p.acc = p.xs + align16(static_cast<size_t>(L.chunk_cols + 1) * nt * 4);  // + zero column
  p.total = p.acc + align16(static_cast<size_t>(L.row_block) * L.v * nt * 4);
  return p;
}

// Start copying `elems` 16-bit values global -> shared (dst and src 16-byte aligned); the
// caller commits and waits (cuda_pipeline.h).
__device__ __forceinline__ void copy_async(uint16_t* dst, const uint16_t* src, int elems) {
  const int vec = elems / 8;
  for (int i = threadIdx.x; i < vec; i += blockDim.x)
    __pipeline_memcpy_async(dst + 8 * i, src + 8 * i, 16);
  for (int i = vec * 8 + threadIdx.x; i < elems; i += blockDim.x) dst[i] = __ldg(src + i);
}

// The slice (and a small residual codebook) as one bulk copy by the tensor memory accelerator
// (compute capability 9.0): one thread queues it and an mbarrier counts its bytes in, where
// cp.async took eight 16-byte copies per thread and a block-wide wait. Returns false where the
// bulk copy cannot take the tensors (sizes or addresses not multiples of 16, an older GPU, or
// VPTQ_SLICED_BULK=0); the caller then copies with cp.async.
// twin: this block and the other of its cluster of two serve the same slice (launched in pairs,
// launch_kernel). Each then reads half of the slice from L2 and multicasts it into both blocks'
// shared memory, so a launch reads each slice once per pair: copying every block's own 64 KB
// slice at the start of a launch took 17 MB of L2 reads for the 264 blocks of an 8B launch, and
// a launch without the copy (timing only, wrong sums) took 11 us less an 8B block (85 -> 74)
// and 270 us less a decode step (csrc/KERNELS.md session 18). Both blocks' mbarriers are set up
// before either copy can signal them (a cluster barrier), and twin_end keeps either from
// exiting before both slices are in.
__device__ __forceinline__ bool bulk_copy_start(void* dst, const void* src, uint32_t bytes,
                                                void* dst2, const void* src2, uint32_t bytes2,
                                                uint64_t* bar, bool allowed, bool twin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto fits = [](const void* p, uint32_t n) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && n % 16 == 0;
  };
  if (!allowed || !fits(src, bytes) || !fits(dst, bytes) || !fits(src2, bytes2) ||
      !fits(dst2, bytes2) || bytes + bytes2 >= (1u << 20))  // the mbarrier's byte count
    return false;  // the same answer in both blocks of a twin pair: same layer, same slice
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n"
                 ::"r"(b), "r"(bytes + bytes2) : "memory");
  }
  if (twin) {  // the other block's mbarrier is ready before this block's half can reach it
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  }
  if (threadIdx.x == 0) {
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    if (twin) {
      uint32_t rank;
      asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
      const uint32_t half = (bytes / 2) & ~15u;
      const uint32_t off = rank == 0 ? 0 : half, n = rank == 0 ? half : bytes - half;
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
          " [%0], [%1], %2, [%3], %4;\n"
          ::"r"(d + off), "l"(static_cast<const char*>(src) + off), "r"(n), "r"(b),
          "h"(static_cast<uint16_t>(3))
          : "memory");
    } else {
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
          " [%0], [%1], %2, [%3];\n"
          ::"r"(d), "l"(src), "r"(bytes), "r"(b)
          : "memory");
    }
    if (bytes2 > 0)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
          " [%0], [%1], %2, [%3];\n"
          ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst2))), "l"(src2), "r"(bytes2),
          "r"(b)
          : "memory");
  }
  return true;
#else
  return false;
#endif
}

// A twin pair's end (bulk_copy_start): each block arrives once its slice is in (twin_arrive)
// and waits for the other before it exits (twin_end), so no block exits while the other's copy
// may still be writing; by then the other has long arrived.
__device__ __forceinline__ void twin_arrive(bool twin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (twin) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void twin_end(bool twin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (twin) asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}

// Waits for the bulk copy (phase 0 of the mbarrier; every thread, after a __syncthreads that
// follows bulk_copy_start, so the barrier's initialisation is visible).
__device__ __forceinline__ void bulk_copy_wait(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
      " @!done bra WAIT;\n}\n" ::"r"(b)
      : "memory");
#endif
}

template <int NT>
__device__ __forceinline__ void load_x(const float* p, float (&xv)[NT]) {
  if constexpr (NT == 1) {
    xv[0] = *p;
  } else if constexpr (NT == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    xv[0] = f.x;
    xv[1] = f.y;
  } else {
#pragma unroll
    for (int c = 0; c < NT / 4; ++c) {
      const float4 f = *reinterpret_cast<const float4*>(p + 4 * c);
      xv[4 * c] = f.x;
      xv[4 * c + 1] = f.y;
      xv[4 * c + 2] = f.z;
      xv[4 * c + 3] = f.w;
    }
  }
}

// One halving step: lanes with bit D << SH set keep the upper H values, the others the lower
// H, and each adds its partner's copy of the half it keeps.
template <int H, int D, int M, int SH>
__device__ __forceinline__ void halve(float (&a)[M], int lane, int& idx) {
  if constexpr (H >= 1 && D >= 1) {
    const bool upper = lane & (D << SH);
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float send = upper ? a[i] : a[i + H];
      const float keep = upper ? a[i + H] : a[i];
      a[i] = keep + __shfl_xor_sync(0xffffffffu, send, D << SH);
    }
    idx += upper ? H : 0;
    halve<H / 2, D / 2, M, SH>(a, lane, idx);
  }
}

// Adds the sum over each group of 16 lanes of a[t * V + j] to its acc[j * NT + t] (acc points
// at this lane's group's sums, which exist where own is set). SH = 0: lanes 0-15 and 16-31
// (the rows of a pair); SH = 1: the even and the odd lanes (kHalves: a row's two halves of
// each codeword). For a power-of-two count the values are halved between lane pairs at each
// step (for 8 values: 8 shuffles for the two groups, where a warp of one row took 9 for that
// one).
template <int NT, int V, int SH = 0>
__device__ __forceinline__ void pair_sum_to(float (&a)[NT * V], int lane, float* acc, bool own) {
  constexpr int M = NT * V;
  if constexpr ((M & (M - 1)) == 0 && M <= 32) {
    int idx = 0;
    halve<M / 2, kRowLanes / 2, M, SH>(a, lane, idx);
    constexpr int kSteps = M == 1 ? 0 : M == 2 ? 1 : M == 4 ? 2 : M == 8 ? 3 : 4;
    constexpr int kKept = M > kRowLanes ? M / kRowLanes : 1;  // values a lane holds now
    constexpr int kLanesEach = M >= kRowLanes ? 1 : kRowLanes / M;  // lanes holding each sum
#pragma unroll
    for (int d = (kRowLanes / 2) >> kSteps; d > 0; d /= 2)
      a[0] += __shfl_xor_sync(0xffffffffu, a[0], d << SH);
    if (own && ((lane >> SH) & (kLanesEach - 1)) == 0) {
#pragma unroll
      for (int i = 0; i < kKept; ++i) {
        const int t = (idx + i) / V, j = (idx + i) % V;
        acc[j * NT + t] += a[i];
      }
    }
  } else {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int d = kRowLanes / 2; d > 0; d >>= 1)
        a[m] += __shfl_xor_sync(0xffffffffu, a[m], d << SH);
      const int t = m / V, j = m % V;
      if (own && ((lane >> SH) & (kRowLanes - 1)) == m % kRowLanes) acc[j * NT + t] += a[m];
    }
  }
}

// A batch of a segment: mini-groups u = 0 .. kBatch - 1 of kRowLanes entries from p (this
// lane's entry of the first), lane l of a half-warp holding entry kRowLanes * u + l. Segments
// are padded to multiples of kRowLanes, so a mini-group is all in or all out. All kBatch
// mini-groups are loaded, from one address and without a condition (the entries array ends
// with kSlicedReadAhead padding entries, so reading past the last segment stays inside it);
// those past the segment's end (u >= n) are replaced at use by the zero column
// (xhat[chunk_cols] = 0) with codeword 0, which adds nothing (a condition per load here cost
// ~40 instructions a segment, the entries pointer reloaded for each).
constexpr int kBatch = 9;  // a v=8 pair of segments averages 2 x 256 entries: 2 batches
constexpr int kShort = 4;  // the last batch of a pair with at most 4 mini-groups left
static_assert(kBatch * kRowLanes * 2 <= kSlicedReadAhead, "the entries' tail covers a batch");

template <bool RES>
__device__ __forceinline__ void load_batch(const uint32_t* p, const uint16_t* rp,
                                           uint32_t (&e)[kBatch], uint32_t (&rc)[kBatch]) {
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    e[u] = __ldcs(p + kRowLanes * u);
    rc[u] = RES ? static_cast<uint32_t>(__ldcs(rp + kRowLanes * u)) : 0u;  // past n: any code
  }
}

// One lookup: a[t * V + j] += xhat[t, column] * (C[codeword][j] (+ R[res][j])). S: the
// codewords' stride in cb (V, or twice V where a lane takes half of each, kHalves); rs: the
// residual codewords' stride in rb (V times res_copies; rb points at this lane's copy).
template <typename T, int V, int NT, bool RES, int S = V>
__device__ __forceinline__ void lookup(uint32_t ent, uint32_t res, const T* cb, const T* rb,
                                       int rs, const float* xs, float (&a)[NT * V]) {
  float w[V];
  load_code<T, V>(cb + (ent & 0xFFFFu) * S, w);
  if (RES) {
    float rw[V];
    load_code<T, V>(rb + res * rs, rw);
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] += rw[j];
  }
  float xv[NT];
  load_x<NT>(xs + (ent >> 16) * NT, xv);
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int j = 0; j < V; ++j) a[t * V + j] = fmaf(xv[t], w[j], a[t * V + j]);
}

// The lookups of a batch of which this lane's segment has n mini-groups and the longer segment
// of the warp's two has nw (the same in every lane): without a branch per lookup, so the
// shared-memory loads of all of them are in flight together; lookups past n take the zero
// entry and add zero.
template <typename T, int V, int NT, bool RES, int S = V>
__device__ __forceinline__ void lookup_batch(const uint32_t (&e)[kBatch],
                                             const uint32_t (&rc)[kBatch], int n, int nw,
                                             uint32_t zero, const T* cb, const T* rb,
                                             int rs, const float* xs, float (&a)[NT * V]) {
  if (nw > kShort) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      lookup<T, V, NT, RES, S>(u < n ? e[u] : zero, rc[u], cb, rb, rs, xs, a);
  } else {
#pragma unroll
    for (int u = 0; u < kShort; ++u)
      lookup<T, V, NT, RES, S>(u < n ? e[u] : zero, rc[u], cb, rb, rs, xs, a);
  }
}

// Columns a thread stages per step: all of their loads are in registers at once.
template <int NT>
constexpr int kStageCols = NT == 1 ? 8 : 4;

// Stages xhat = x * scale for columns p0 .. p0 + pc - 1 of every token in fp32, kStageCols
// columns per thread and step, all loads issued before the first use (a chain of dependent
// global loads here costs more than the lookups of a small projection), and returns this
// thread's share of x . weight_bias over these columns in dot[t]: slice 0's block of the chunk
// adds dot(x, b) to its sums, and summing it after the lookups put two more DRAM round trips
// on every launch's critical path. weight_bias was prefetched into L2 (prefetch_l2), so its
// loads ride with x's.
// The scale was put in xs[i * NT] by prestage_scale (the same thread for the same i), before
// the kernel waited for x.
template <typename T, int NT>
__device__ __forceinline__ void stage_x(const SlicedLayer& L, const T* x, int ntok, int p0,
                                        int pc, float* xs, float (&dot)[NT]) {
  const T* wbias = static_cast<const T*>(L.wbias);
#pragma unroll
  for (int t = 0; t < NT; ++t) dot[t] = 0.f;
  constexpr int C = kStageCols<NT>;
  for (int i0 = threadIdx.x; i0 < pc; i0 += C * blockDim.x) {
    float sc[C], b[C];
    float xv[C][NT];
#pragma unroll
    for (int q = 0; q < C; ++q) {
      const int i = i0 + q * blockDim.x;
      sc[q] = i < pc ? xs[i * NT] : 1.f;
      b[q] = i < pc && wbias ? to_f(wbias[p0 + i]) : 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t)
        xv[q][t] = i < pc && t < ntok ? to_f(x[static_cast<size_t>(t) * L.K + p0 + i]) : 0.f;
    }
#pragma unroll
    for (int q = 0; q < C; ++q) {
      const int i = i0 + q * blockDim.x;
#pragma unroll
      for (int t = 0; t < NT; ++t) dot[t] = fmaf(xv[q][t], b[q], dot[t]);
      if (i < pc) {
#pragma unroll
        for (int t = 0; t < NT; ++t) xs[i * NT + t] = xv[q][t] * sc[q];
      }
    }
  }
}

// Asks L2 for the 128-byte lines of bytes [p, p + n), one per thread (no registers held: the
// lines are there when stage_x loads them with x).
__device__ __forceinline__ void prefetch_l2(const void* p, size_t n) {
  if (p == nullptr) return;
  const char* c = static_cast<const char*>(p);
  for (size_t o = threadIdx.x * size_t{128}; o < n; o += blockDim.x * size_t{128})
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(c + o));
}

// The item after (c, p) in a warp's stream: the warp's next pair of rows of its block's chunk
// c, or none (c = n_chunks: the stream has ended).
__device__ __forceinline__ void next_item(int& c, int& p, int pairs, int n_chunks) {
  p += kWarpsS;
  if (p >= pairs) c = n_chunks;
}

// The entries [x, y) of the segment of row r of chunk c in slice s; empty past the stream's end
// and past the row block's last row r1 (the second row of an odd block's last pair).
__device__ __forceinline__ int2 segment(const SlicedLayer& L, int s, int c, int r, int r1) {
  if (c >= L.n_chunks || r >= r1) return make_int2(0, 0);
  const int* o = L.offsets + (s * L.n_chunks + c) * L.rows + r;
  return make_int2(__ldg(o), __ldg(o + 1));
}

// The chunk's scale (columns p0 .. p0 + pc - 1) into xs[i * NT], with the thread-to-column map
// of stage_x.
template <typename T, int NT>
__device__ __forceinline__ void prestage_scale(const SlicedLayer& L, int p0, int pc, float* xs) {
  const T* scale = static_cast<const T*>(L.scale);
  constexpr int C = kStageCols<NT>;
  for (int i0 = threadIdx.x; i0 < pc; i0 += C * blockDim.x) {
    float sc[C];
#pragma unroll
    for (int q = 0; q < C; ++q) {
      const int i = i0 + q * blockDim.x;
      sc[q] = i < pc && scale ? to_f(scale[p0 + i]) : 1.f;
    }
#pragma unroll
    for (int q = 0; q < C; ++q) {
      const int i = i0 + q * blockDim.x;
      if (i < pc) xs[i * NT] = sc[q];
    }
  }
}

// The layer of block b of a launch of G (layer i owns row_blocks * n_slices * n_chunks blocks
// after those of layer i - 1) and, in first, the index of that layer's first block.
template <bool GROUP>
__device__ __forceinline__ int layer_of(const SlicedGroup& G, int b, int& first) {
  int l = 0;
  first = 0;
  while (GROUP && l + 1 < G.n && b >= first + G.L[l].row_blocks * G.L[l].parts()) {
    first += G.L[l].row_blocks * G.L[l].parts();
    ++l;
  }
  return l;
}

// kHalves: a v = 16 row is a warp's item alone, lanes 2i and 2i + 1 taking codeword values 0-7
// and 8-15 of the row's entry i of each run of 16 (the same entry and xhat addresses in both:
// broadcasts), so that a lane holds 8 sums, as at v = 8, where a lane holding 16 took 96-123
// registers and one block an SM. A quarter-warp's 16-byte loads then read four whole 32-byte
// codewords, which spread_order puts in four different bank groups: one wavefront, where eight
// codewords' same halves share 16 of the 32 banks (two wavefronts at least).
template <int V, bool RES>
constexpr bool kHalves = V == 16 && !RES;
template <int V, bool RES>
constexpr int kLaneV = kHalves<V, RES> ? V / 2 : V;  // a lane's share of a codeword

// Two blocks per SM where 64 registers hold the loop without spilling (a lane's v x tokens <=
// 8, no residual: the decode path of the 2-bit community models, v8-k65536-0 and
// v16-k65536-65536); larger tiles get more registers.
// GROUP: G holds several layers (else one, read at fixed offsets: a layer index known only at
// run time turns every read of L into an indexed constant load, which cost a single layer 15%).
template <typename T, int V, int NT, bool RES, bool GROUP>
__global__ void __launch_bounds__(kSlicedThreads, NT * kLaneV<V, RES> <= 8 && !RES ? 2 : 1)
    sliced_gemv_kernel(const __grid_constant__ SlicedGroup G, const T* __restrict__ x, int ntok,
                       bool bulk_allowed, bool in_pairs) {
  pdl_trigger();  // the next kernel may be scheduled beside this one (vptq_device.cuh)
  // This block's layer (layer i owns row_blocks * n_slices * n_chunks blocks after those of
  // layer i - 1), row block rblk and part = c * n_slices + s: slice s of column chunk c.
  const int b = blockIdx.x;
  int first = 0;
  const int l = layer_of<GROUP>(G, b, first);
  const SlicedLayer& L = G.L[GROUP ? l : 0];
  if (b - first >= L.row_blocks * L.parts()) return;  // the pad of an odd grid in pairs
  // Launched in clusters of two (in_pairs): blocks b and b ^ 1 are twins where both lie in the
  // blocks of this layer's part, [lo, lo + row_blocks) (all pairs but those straddling two
  // parts), and then share the slice copy (bulk_copy_start).
  const int lo = first + (b - first) / L.row_blocks * L.row_blocks;
  bool twin = in_pairs && (b ^ 1) >= lo && (b ^ 1) < lo + L.row_blocks;
  T* __restrict__ out = static_cast<T*>(G.out[GROUP ? l : 0]);
  float* __restrict__ ws = G.ws[GROUP ? l : 0];
  const int rblk = (blockIdx.x - first) % L.row_blocks, part = (blockIdx.x - first) / L.row_blocks;
  const int s = part % L.n_slices, c = part / L.n_slices;
  const int p0 = c * L.chunk_cols, pc = min(L.chunk_cols, L.K - p0);  // the chunk's columns
  extern __shared__ __align__(16) unsigned char smem[];
  const int rcopies = RES ? res_copies(V, L.res_cw) : 1;  // a power of two
  const SmemPlan sp = plan(L, NT, rcopies);
  T* cb = reinterpret_cast<T*>(smem + sp.cb);
  T* rb = reinterpret_cast<T*>(smem + sp.res);
  float* xs = reinterpret_cast<float*>(smem + sp.xs);   // [chunk_cols + 1][NT]
  float* acc = reinterpret_cast<float*>(smem + sp.acc);  // [row_block][V][NT]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = rblk * L.row_block, r1 = min(L.rows, r0 + L.row_block);
  const int cw0 = s * L.slice_cw, ncw = min(L.slice_cw, L.n_cw - cw0);
  constexpr bool H = kHalves<V, RES>;
  constexpr int VL = kLaneV<V, RES>;
  // which row of the warp's pair this lane works on, or (H) which half of each codeword
  const int half = H ? lane & 1 : lane / kRowLanes;
  const int slot = H ? lane >> 1 : lane % kRowLanes;  // this lane's entry of each run of 16
  const uint32_t* entries = L.entries + slot;
  const uint16_t* res_codes = RES ? L.res_codes + slot : nullptr;
  const uint32_t zero = static_cast<uint32_t>(L.chunk_cols) << 16;
  // A warp's work is a stream of items, pairs of rows of the block's chunk: pairs warp,
  // warp + 16, ... (pair p: rows r0 + 2p and r0 + 2p + 1); each lane fetches the bounds of its
  // half's row. An item is one or more batches (the longer of its two segments decides how
  // many); the bounds are fetched two items ahead and the entries one batch ahead, across items
  // too. The first two items' bounds are requested before the slice copy is queued.
  const int first_pair = warp, pairs = H ? r1 - r0 : (r1 - r0 + 1) / 2;
  const auto row_of = [&](int p) { return H ? r0 + p : r0 + 2 * p + half; };
  const T* cbl = H ? cb + half * VL : cb;  // this lane's values of each codeword
  int cn = first_pair < pairs ? c : L.n_chunks, pn = first_pair;  // whose bounds come next
  int2 cur = segment(L, s, cn, row_of(pn), r1);
  next_item(cn, pn, pairs, L.n_chunks);
  int2 nxt = segment(L, s, cn, row_of(pn), r1);
  next_item(cn, pn, pairs, L.n_chunks);
  // The codebook slice streams into shared memory while the first entries are fetched.
  __shared__ __align__(8) uint64_t slice_bar;
  const T* slice_src = static_cast<const T*>(L.table) + static_cast<size_t>(cw0) * V;
  const int res_elems = RES ? L.res_cw * rcopies * V : 0;
  const bool bulk = bulk_copy_start(cb, slice_src, ncw * V * 2, rb, L.res_table, res_elems * 2,
                                    &slice_bar, bulk_allowed, twin);
  twin = twin && bulk;  // without the bulk copy (in both twins alike) each copies its own
  if (!bulk) {
    copy_async(reinterpret_cast<uint16_t*>(cb), reinterpret_cast<const uint16_t*>(slice_src),
               ncw * V);
    if (RES) copy_async(reinterpret_cast<uint16_t*>(rb),
                        static_cast<const uint16_t*>(L.res_table), res_elems);
    __pipeline_commit();
  }
  for (int i = threadIdx.x; i < (r1 - r0) * V * NT; i += blockDim.x) acc[i] = 0.f;
  // The chunk's scale, its weight_bias into L2 and the first batch of entries: the layer's own
  // too.
  prestage_scale<T, NT>(L, p0, pc, xs);
  if (L.wbias)
    prefetch_l2(static_cast<const T*>(L.wbias) + p0, static_cast<size_t>(pc) * sizeof(T));
  uint32_t e[kBatch], rc[kBatch];
  load_batch<RES>(entries + cur.x, RES ? res_codes + cur.x : nullptr, e, rc);
  // Everything above reads only the layer's own tensors. Launched as a programmatic dependent
  // launch (launch_pdl), the kernel got here while the previous kernel in the stream was
  // still running; x and the workspace are touched only after it has finished.
  pdl_wait();

  __shared__ float red[kWarpsS][NT];  // per warp: its share of x . weight_bias, per token
  static_assert(sizeof(red) + sizeof(float) * NT + 64 <= kSlicedStaticSmem,
                "static shared arrays (red, xb, slice_bar, last) beyond kSlicedStaticSmem");
  {
    float dot[NT];
    stage_x<T, NT>(L, x, ntok, p0, pc, xs, dot);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) dot[t] += __shfl_xor_sync(0xffffffffu, dot[t], d);
      if (lane == 0) red[warp][t] = dot[t];
    }
  }
  for (int i = threadIdx.x; i < NT; i += blockDim.x) xs[L.chunk_cols * NT + i] = 0.f;
  if (bulk) {
    __syncthreads();  // the mbarrier's initialisation, before anyone waits on it
    bulk_copy_wait(&slice_bar);
    twin_arrive(twin);
  } else {
    __pipeline_wait_prior(0);
  }
  __syncthreads();
  for (int p = first_pair; p < pairs; p += kWarpsS) {  // the current item: pair p, bounds cur
    const int beg = cur.x, n = (cur.y - cur.x) / kRowLanes;  // this lane's row's mini-groups
    const int nw = max(n, __shfl_xor_sync(0xffffffffu, n, kRowLanes));  // the pair's longer
    const int2 after = segment(L, s, cn, row_of(pn), r1);  // used two items from now
    next_item(cn, pn, pairs, L.n_chunks);
    float a[NT * VL];  // a[t * VL + j]: value j of this lane's share
#pragma unroll
    for (int m = 0; m < NT * VL; ++m) a[m] = 0.f;
    for (int u0 = 0;; u0 += kBatch) {  // the batch of mini-groups u0 .. u0 + kBatch - 1
      // the entries one batch ahead: this item's next batch, else the next item's first (a
      // lane whose row has ended reads from its segment's end, which stays in the tail)
      const bool more = u0 + kBatch < nw;
      const int ahead = more ? beg + kRowLanes * min(u0 + kBatch, n) : nxt.x;
      uint32_t ne[kBatch], nrc[kBatch];
      load_batch<RES>(entries + ahead, RES ? res_codes + ahead : nullptr, ne, nrc);
      // this lane's copy of the residual codebook, and their stride
      const T* rbl = RES ? rb + (lane & (rcopies - 1)) * V : rb;
      lookup_batch<T, VL, NT, RES, V>(e, rc, n - u0, nw - u0, zero, cbl, rbl, rcopies * V, xs,
                                      a);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        e[u] = ne[u];
        rc[u] = nrc[u];
      }
      if (!more) break;
    }
    const int row = row_of(p);  // past r1 (an odd block's last pair): nothing to add
    float* row_acc = acc + (row - r0) * V * NT + (H ? half * VL * NT : 0);
    pair_sum_to<NT, VL, H ? 1 : 0>(a, lane, row_acc, row < r1);
    cur = nxt;
    nxt = after;
  }
  __syncthreads();

  // dot(x, b) over the chunk's columns, from the warps' shares: slice 0's block of each chunk
  // adds it to its sums, so that the terms add up to x W^T + bias with bias alone in term 0.
  __shared__ float xb[NT];
  if (s == 0) {
    if (threadIdx.x < NT) {
      float total = 0.f;
      for (int w = 0; w < kWarpsS; ++w) total += red[w][threadIdx.x];
      xb[threadIdx.x] = L.wbias ? total : 0.f;  // x * 0 would turn an infinite x into NaN
    }
    __syncthreads();
  }
  // This part's sums -> ws[part][t][n] (partial: term 1 + part of the output, vptq.h).
  const int term = G.partial ? part + 1 : part;
  for (int i = threadIdx.x; i < (r1 - r0) * V; i += blockDim.x) {
    const int n = r0 * V + i;
    if (n >= L.N) break;
    for (int t = 0; t < ntok; ++t)
      ws[(static_cast<size_t>(term) * ntok + t) * L.N + n] =
          s == 0 ? acc[i * NT + t] + xb[t] : acc[i * NT + t];
  }
  const T* bias = static_cast<const T*>(L.bias);
  const int outs = min((r1 - r0) * V, L.N - r0 * V);
  const int items = outs * ntok;  // item j: output n = r0 * V + j % outs, token j / outs
  if (G.partial) {  // the reader adds the terms; the blocks of part 0 write term 0
    if (part == 0) {
      for (int j = threadIdx.x; j < items; j += blockDim.x) {
        const int n = r0 * V + j % outs, t = j / outs;
        ws[static_cast<size_t>(t) * L.N + n] = bias ? to_f(bias[n]) : 0.f;
      }
    }
    twin_end(twin);
    return;
  }
  const int n_parts = L.parts();
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(L.counters + rblk, 1) == n_parts - 1;
  __syncthreads();
  twin_end(twin);
  if (!last) return;
  __threadfence();

  // The last block of this row block: bias and the sum over parts, kSumItems outputs per thread
  // at a time with kSumParts parts of each in flight (one output per thread and eight parts took
  // four to eight rounds of L2 latency here, alone on the critical path).
  constexpr int kSumItems = 4, kSumParts = 8;
  for (int j0 = threadIdx.x; j0 < items; j0 += kSumItems * blockDim.x) {
    float total[kSumItems];
    int at[kSumItems];  // ws holds n_parts x ntok x N < 2^31 floats (sliced_supported)
#pragma unroll
    for (int k = 0; k < kSumItems; ++k) {
      const int j = min(j0 + k * static_cast<int>(blockDim.x), items - 1);
      const int n = r0 * V + j % outs, t = j / outs;
      total[k] = bias ? to_f(bias[n]) : 0.f;
      at[k] = t * L.N + n;
    }
    const int stride = ntok * L.N;  // from one part to the next
    int q = 0;
    for (; q + kSumParts <= n_parts; q += kSumParts) {
      float v[kSumItems][kSumParts];
#pragma unroll
      for (int k = 0; k < kSumItems; ++k)
#pragma unroll
        for (int u = 0; u < kSumParts; ++u) v[k][u] = __ldcg(ws + (q + u) * stride + at[k]);
#pragma unroll
      for (int k = 0; k < kSumItems; ++k)
#pragma unroll
        for (int u = 0; u < kSumParts; ++u) total[k] += v[k][u];
    }
    for (; q < n_parts; ++q)
#pragma unroll
      for (int k = 0; k < kSumItems; ++k) total[k] += __ldcg(ws + q * stride + at[k]);
#pragma unroll
    for (int k = 0; k < kSumItems; ++k)
      if (j0 + k * static_cast<int>(blockDim.x) < items) out[at[k]] = from_f<T>(total[k]);
  }
  if (threadIdx.x == 0) L.counters[rblk] = 0;  // ready for the next call
}

template <typename T, int V, int NT, bool RES, bool GROUP>
cudaError_t launch_kernel(const SlicedGroup& G, const void* x, int T_, cudaStream_t stream) {
  size_t smem = 0;
  unsigned blocks = 0;
  for (int i = 0; i < G.n; ++i) {
    smem = std::max(smem, plan(G.L[i], NT, res_copies(G.L[i].v, G.L[i].res_cw)).total);
    blocks += static_cast<unsigned>(G.L[i].row_blocks * G.L[i].parts());
  }
  auto kernel = sliced_gemv_kernel<T, V, NT, RES, GROUP>;
  static const bool bulk = !switched_off("VPTQ_SLICED_BULK");  // 0: the slice copy by cp.async
  // In clusters of two blocks sharing each slice copy (bulk_copy_start), with the bulk copy on
  // compute capability 9.x (measured there; ptxas warns that the multicast may be slow on later
  // GPUs); VPTQ_SLICED_PAIRS=0 launches single blocks, each copying its own.
  static const bool pairs_on = !switched_off("VPTQ_SLICED_PAIRS");
  const bool pairs = pairs_on && bulk && blocks > 1 && compute_major() == 9;
  // The kernel's shared-memory limit, raised on each device only when a launch needs more
  // than the last one set (it was set on every eager launch). The raise holds a lock, so that
  // the limit only grows and `allowed` never says more than was set, whichever host threads
  // launch.
  static std::atomic<int> allowed[64] = {};
  static std::mutex raising;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const int need = static_cast<int>(smem);
  const bool cached = dev >= 0 && dev < 64;
  if (!cached || allowed[dev].load() < need) {
    std::lock_guard<std::mutex> hold(raising);
    if (!cached || allowed[dev].load() < need) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, need);
      if (err != cudaSuccess) return err;
      if (cached) allowed[dev].store(need);
    }
  }
  if (pairs) blocks += blocks % 2;  // the pad returns at once
  return launch_pdl_in(pairs ? 2 : 0, kernel, dim3(blocks), dim3(kSlicedThreads), smem, stream,
                       G, static_cast<const T*>(x), T_, bulk, pairs);
}

template <typename T, int V, int NT>
cudaError_t launch_typed(const SlicedGroup& G, const void* x, int T_, cudaStream_t stream) {
  const bool res = G.L[0].res_cw > 0;
  if constexpr (NT <= kGroupTokens) {
    if (G.n > 1) {
      if (res) return launch_kernel<T, V, NT, true, true>(G, x, T_, stream);
      return launch_kernel<T, V, NT, false, true>(G, x, T_, stream);
    }
  }
  if (G.n > 1) return cudaErrorInvalidValue;  // more tokens than a group takes
  if (res) return launch_kernel<T, V, NT, true, false>(G, x, T_, stream);
  return launch_kernel<T, V, NT, false, false>(G, x, T_, stream);
}

// v x tokens accumulators per lane stay at or below 32 (three such sets live at a row's end).
template <typename T, int NT>
cudaError_t by_v(const SlicedGroup& G, const void* x, int T_, cudaStream_t stream) {
  switch (G.L[0].v) {
    case 2: return launch_typed<T, 2, NT>(G, x, T_, stream);
    case 4: return launch_typed<T, 4, NT>(G, x, T_, stream);
    case 6: if constexpr (NT <= 4) return launch_typed<T, 6, NT>(G, x, T_, stream);
      break;
    case 8: if constexpr (NT <= 4) return launch_typed<T, 8, NT>(G, x, T_, stream);
      break;
    case 10: if constexpr (NT <= 2) return launch_typed<T, 10, NT>(G, x, T_, stream);
      break;
    case 12: if constexpr (NT <= 2) return launch_typed<T, 12, NT>(G, x, T_, stream);
      break;
    case 16: if constexpr (NT <= 2) return launch_typed<T, 16, NT>(G, x, T_, stream);
      break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// The launches for a tile of 1, 2, 4 or 8 tokens, fp16 or bf16: each in its own translation
// unit (vptq_sliced_<tile>.cu, which defines it with VPTQ_SLICED_TILE), so that a build
// compiles the kernel instances in parallel; vptq_sliced.cu dispatches to them.
#define VPTQ_SLICED_TILE_SIGNATURE(NT)                                                         \
  cudaError_t launch_sliced_tile##NT(const SlicedGroup& G, const void* x, int T, DType dtype,  \
                                     cudaStream_t stream)
#define VPTQ_SLICED_TILE(NT)                                                                   \
  VPTQ_SLICED_TILE_SIGNATURE(NT) {                                                             \
    if (dtype == DType::kHalf) return by_v<__half, NT>(G, x, T, stream);                       \
    return by_v<__nv_bfloat16, NT>(G, x, T, stream);                                           \
  }
VPTQ_SLICED_TILE_SIGNATURE(1);
VPTQ_SLICED_TILE_SIGNATURE(2);
VPTQ_SLICED_TILE_SIGNATURE(4);
VPTQ_SLICED_TILE_SIGNATURE(8);

}  // namespace vptq
