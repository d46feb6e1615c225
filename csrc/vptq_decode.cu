// The rest of a decode step, fused: at batch 1 the projections are a third of the launches,
// and each small PyTorch kernel between them (RMSNorm alone is seven) costs a launch and a
// drain of the GPU. Measured on the H200 (session 6, `bench e2e`-built Llama-3.1-8B, one eager
// decode step under torch.profiler): 2.3 ms of the 6.8 ms step went to ~45 such kernels per
// layer. These kernels do that work in six launches per layer (csrc/KERNELS.md):
// - rms_norm / add_rms_norm: y = w * norm(x) with the residual sum x + r done on the way;
// - rope_kv: RoPE on q and k at the position held on the device, k and v written into the
//   static KV cache there (also a prefill's T tokens from a position given by the host, where
//   PyTorch takes some twenty small kernels a layer);
// - decode_attention: one query token against the cache up to that position (GQA, sliding
//   window), split over the keys (flash-decoding), then the splits combined;
// - silu_mul: silu(gate) * up;
// - embed_rows: rows of an embedding table kept in pinned host memory;
// - greedy_pick: the end of a greedy step (the next token, its seen mark, the position + 1);
// - sample_pick: the same with temperature, top-p and min-p sampling.
// Every rounding matches the PyTorch code they replace (engine/model.py): fp32 inside, the
// activation dtype where PyTorch rounds. add_rms_norm, rope_kv and silu_mul also take their
// inputs as a sliced GEMV's partial sums (vptq.h Parts) and add them first, rounded as the
// GEMV would have written them.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cooperative_groups.h>

#include "vptq.h"
#include "vptq_device.cuh"

namespace vptq {
namespace {

constexpr int kNormThreads = 1024;

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += red[w];
  return total;
}

// Eight values of T as one 16-byte vector.
template <typename T>
struct Vec8 {
  uint4 u;
  __device__ __forceinline__ float get(int i) const {
    return to_f(reinterpret_cast<const T*>(&u)[i]);
  }
  __device__ __forceinline__ void set(int i, float f) {
    reinterpret_cast<T*>(&u)[i] = from_f<T>(f);
  }
};

// One block per row. With r: s = round(x + r) (PyTorch's x + r), written to sum; then
// out = round(round(s * rsqrt(mean(s^2) + eps)) * w), as RMSNorm does in the activation dtype.
// VPT > 0: H % 8 == 0 and each thread holds up to VPT 8-value vectors in registers (one load
// of each input, all issued at once); VPT == 0: any H, a strided loop reading sum back, and x
// may come as partial sums (xp; add_rms_norm_parts_kernel is the fast way for those).
template <typename T, int VPT>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(
    const T* __restrict__ x, Parts xp, const T* __restrict__ r, const T* __restrict__ w,
    T* __restrict__ out, T* sum, int H, float eps) {
  pdl_trigger();
  pdl_wait();  // inputs come from the previous kernel (vptq_device.cuh)
  __shared__ float red[kNormThreads / 32];
  const size_t row = static_cast<size_t>(blockIdx.x) * H;
  float ss = 0.f;
  if constexpr (VPT > 0) {
    const int n_vec = H / 8;
    Vec8<T> xs[VPT], ws[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int i = threadIdx.x + j * blockDim.x;
      if (i < n_vec) {
        xs[j].u = reinterpret_cast<const uint4*>(x + row)[i];
        ws[j].u = reinterpret_cast<const uint4*>(w)[i];
        if (r) {
          Vec8<T> rv;
          rv.u = reinterpret_cast<const uint4*>(r + row)[i];
#pragma unroll
          for (int e = 0; e < 8; ++e) xs[j].set(e, xs[j].get(e) + rv.get(e));
          reinterpret_cast<uint4*>(sum + row)[i] = xs[j].u;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(xs[j].get(e), xs[j].get(e), ss);
      }
    }
    const float inv = rsqrtf(block_sum(ss, red) / H + eps);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int i = threadIdx.x + j * blockDim.x;
      if (i < n_vec) {
        Vec8<T> o;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          o.set(e, to_f(from_f<T>(xs[j].get(e) * inv)) * ws[j].get(e));
        reinterpret_cast<uint4*>(out + row)[i] = o.u;
      }
    }
  } else {
    for (int p = threadIdx.x; p < H; p += blockDim.x) {
      float s = act<T>(x, xp, row + p);
      if (r) {
        const T rounded = from_f<T>(s + to_f(r[row + p]));
        sum[row + p] = rounded;
        s = to_f(rounded);
      }
      ss = fmaf(s, s, ss);
    }
    const float inv = rsqrtf(block_sum(ss, red) / H + eps);
    for (int p = threadIdx.x; p < H; p += blockDim.x) {
      const float s = r ? to_f(sum[row + p]) : act<T>(x, xp, row + p);  // sums: this thread's
      const float n = to_f(from_f<T>(s * inv));
      out[row + p] = from_f<T>(n * to_f(w[p]));
    }
  }
}

// add_rms_norm of x given as partial sums (the sliced GEMV's output, vptq.h Parts): one block
// reading all of them (16 or more terms of every value) would take the SM's L2 bandwidth for
// microseconds, so a cluster of kNormCluster blocks takes each row, block b summing the terms
// of columns [b H / C, (b + 1) H / C), kPartCols neighbours per thread and step (float4 loads);
// the blocks' sums of squares meet in distributed shared memory. Roundings as rms_norm_kernel.
// Compute capability 9.0 (clusters); H % (kNormCluster * kPartCols) == 0, 16-byte aligned
// terms (norm_parts_fits).
constexpr int kNormCluster = 8;
constexpr int kPartCols = 4;
constexpr int kPartSteps = 4;
constexpr int kPartThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPartThreads) add_rms_norm_parts_kernel(
    Parts xp, const T* __restrict__ r, const T* __restrict__ w, T* __restrict__ out,
    T* __restrict__ sum, int H, float eps) {
  pdl_trigger();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // This block has started: the others may write into its shared memory once they have seen
  // every block of the cluster arrive here (the wait below, long after).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  __shared__ float red[kPartThreads / 32];
  __shared__ float all_ss[kNormCluster];
  const size_t row = static_cast<size_t>(blockIdx.y) * H;
  const int rank = static_cast<int>(cluster.block_rank());
  const int cols = H / kNormCluster, c0 = rank * cols;
  float s[kPartSteps][kPartCols];
  T wv[kPartSteps][kPartCols];  // the weight, read before the wait (no kernel writes it)
#pragma unroll
  for (int k = 0; k < kPartSteps; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * kPartCols;
    if (c < cols) *reinterpret_cast<uint2*>(wv[k]) = *reinterpret_cast<const uint2*>(w + c0 + c);
  }
  pdl_wait();  // the terms and the residual come from earlier kernels (vptq_device.cuh)
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kPartSteps; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * kPartCols;
    if (c < cols) {
      const size_t i = row + c0 + c;
      T rv[kPartCols], sv[kPartCols];  // the residual first: its load rides with the terms'
      *reinterpret_cast<uint2*>(rv) = *reinterpret_cast<const uint2*>(r + i);
      float4 t = __ldcg(reinterpret_cast<const float4*>(xp.p + i));
      float4 v[16];
      int q = 1;
      for (; q + 16 <= xp.n; q += 16) {  // as parts_sum: 16 terms in flight
#pragma unroll
        for (int u = 0; u < 16; ++u)
          v[u] = __ldcg(reinterpret_cast<const float4*>(xp.p + (q + u) * xp.stride + i));
#pragma unroll
        for (int u = 0; u < 16; ++u) {
          t.x += v[u].x;
          t.y += v[u].y;
          t.z += v[u].z;
          t.w += v[u].w;
        }
      }
      for (; q < xp.n; ++q) {
        const float4 u = __ldcg(reinterpret_cast<const float4*>(xp.p + q * xp.stride + i));
        t.x += u.x;
        t.y += u.y;
        t.z += u.z;
        t.w += u.w;
      }
      const float tv[kPartCols] = {t.x, t.y, t.z, t.w};
#pragma unroll
      for (int e = 0; e < kPartCols; ++e) {
        sv[e] = from_f<T>(to_f(from_f<T>(tv[e])) + to_f(rv[e]));  // round(round(x) + r)
        s[k][e] = to_f(sv[e]);
        ss = fmaf(s[k][e], s[k][e], ss);
      }
      *reinterpret_cast<uint2*>(sum + i) = *reinterpret_cast<const uint2*>(sv);
    }
  }
  // Each block writes its sum of squares into every block's all_ss[its rank]; after one
  // barrier each reads only its own shared memory (reading the others' took a second barrier,
  // so that no block left while another still read it: 20 us a step of the 8B model,
  // csrc/KERNELS.md session 14).
  const float mine = block_sum(ss, red);
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  if (threadIdx.x < kNormCluster) *cluster.map_shared_rank(&all_ss[rank], threadIdx.x) = mine;
  cluster.sync();
  float total = 0.f;
  for (int b = 0; b < kNormCluster; ++b) total += all_ss[b];
  const float inv = rsqrtf(total / H + eps);
#pragma unroll
  for (int k = 0; k < kPartSteps; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * kPartCols;
    if (c < cols) {
      const size_t i = row + c0 + c;
      T ov[kPartCols];
#pragma unroll
      for (int e = 0; e < kPartCols; ++e)
        ov[e] = from_f<T>(to_f(from_f<T>(s[k][e] * inv)) * to_f(wv[k][e]));
      *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<const uint2*>(ov);
    }
  }
#else
  pdl_wait();
#endif
}

// Block (b, t): for b < H it rotates query head b of token t into q_out; for b = H + j it
// rotates key head j and writes it and value head j into the caches at token t's position
// p = *pos + start + t (pos null: start + t), cos and sin read at row p - start. One decode
// token: the position held on the device, the whole tables (start 0); a prefill's T tokens:
// start on the host, the tables' rows from start on. Half-split RoPE: the first D/2 lanes
// pair with the second half, x * cos + rotate(x) * sin, each product rounded as PyTorch does.
template <typename T>
__global__ void rope_kv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, Parts qp, Parts kp, Parts vp,
                               const float* __restrict__ cos,
                               const float* __restrict__ sin, const int64_t* __restrict__ pos,
                               T* __restrict__ q_out, T* __restrict__ k_cache,
                               T* __restrict__ v_cache, int H, int Hkv, int D, int S, int T_,
                               int64_t start) {
  pdl_trigger();
  // pos changes only after the step's last layer (as in attn_split_kernel): it and this
  // thread's first cos and sin are read before the wait, off the path behind q, k and v
  const int t = blockIdx.y;
  const int64_t p = (pos != nullptr ? *pos : 0) + start + t;
  const int64_t row = (p - start) * D;
  const int d0 = threadIdx.x;
  const float c0 = d0 < D ? cos[row + d0] : 0.f, s0 = d0 < D ? sin[row + d0] : 0.f;
  pdl_wait();  // q, k and v come from the previous kernel (vptq_device.cuh)
  const int head = blockIdx.x;
  const bool is_q = head < H;
  const int j = head - H;
  const T* src = is_q ? q : k;
  const Parts sp = is_q ? qp : kp;
  const size_t kv_at = (static_cast<size_t>(t) * Hkv + (is_q ? 0 : j)) * D;
  // the head's first value in token t's row of q or k
  const size_t at = is_q ? (static_cast<size_t>(t) * H + head) * D : kv_at;
  const size_t slot = (static_cast<size_t>(j) * S + p) * D;  // cache [1, Hkv, S, D]
  const int half = D / 2;
  for (int d = d0; d < D; d += blockDim.x) {
    // this value, its rotation partner and (key heads) the value head's: loads all at once
    const T* ys[3] = {src, src, v};
    const Parts ps[3] = {sp, sp, vp};
    const size_t at3[3] = {at + d, at + (d < half ? d + half : d - half), kv_at + d};
    float got[3];
    if (is_q)
      acts<T, 2>(ys, ps, at3, got);
    else
      acts<T, 3>(ys, ps, at3, got);
    const float xv = got[0], other = got[1];
    const float rot = d < half ? -other : other;
    const float c = d == d0 ? c0 : cos[row + d], s = d == d0 ? s0 : sin[row + d];
    const T y = from_f<T>(__fadd_rn(__fmul_rn(xv, c), __fmul_rn(rot, s)));
    if (is_q) {
      q_out[(static_cast<size_t>(head) * T_ + t) * D + d] = y;  // [1, H, T, D]
    } else {
      k_cache[slot + d] = y;
      v_cache[slot + d] = from_f<T>(got[2]);
    }
  }
}

constexpr int kAttnWarps = 4;
constexpr int kAttnBatch = 4;  // keys a warp works on at a time
constexpr int kMaxSplits = 256;

// Query heads a block of decode attention takes of the G that share a KV head: groups of four
// where G is a larger multiple of four. A warp's lanes run over the head dimension, so each
// query head's score costs a five-shuffle sum a key, and a block's pace falls with its heads:
// for a 32768-token cache, blocks of all eight of Llama-3.1-70B's heads took 130 us, two blocks
// of four a KV head 91 us (the second block's keys mostly come from L2); Llama-3.1-8B's four
// heads 47 us, 65% of the H200's read rate (bench attention, csrc/KERNELS.md session 36).
__host__ __device__ constexpr int attn_block_heads(int G) { return G > 4 && G % 4 == 0 ? 4 : G; }

// E values of T (a lane's share of one key or value row) as loaded: raw halves in E / 2 words,
// half the registers of floats, converted where they are used.
template <int E>
struct RawRow {
  uint32_t w[E / 2];
};

template <typename T, int E>
__device__ __forceinline__ RawRow<E> load_row(const T* p) {
  static_assert(E == 2 || E == 4, "head dimensions 64 and 128");
  RawRow<E> r;
  if constexpr (E == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    r.w[0] = u.x;
    r.w[1] = u.y;
  } else {
    r.w[0] = *reinterpret_cast<const uint32_t*>(p);
  }
  return r;
}

template <typename T, int E>
__device__ __forceinline__ void unpack_row(const RawRow<E>& r, float (&out)[E]) {
  const T* h = reinterpret_cast<const T*>(r.w);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = to_f(h[e]);
}

// The end of both decode-attention kernels: the W warps' online-softmax states of the block's G
// query heads (sm: m and l, so: o), read from shared memory after a __syncthreads, merged, and
// written to ws as split `split` of query heads h G .. h G + G - 1 (vptq.h AttnArgs; the grid's
// x dimension times G is every query head). A warp that saw no key has l = 0 and counts nothing.
template <int W, int G, int D>
__device__ __forceinline__ void merge_warps(const float (&sm)[W][G][2], const float (&so)[W][G][D],
                                            float* __restrict__ ws, int h, int split, int splits) {
  for (int i = threadIdx.x; i < G * (D + 2); i += blockDim.x) {
    const int g = i / (D + 2), c = i % (D + 2);
    float mm = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < W; ++w) mm = fmaxf(mm, sm[w][g][0]);
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float f = sm[w][g][1] > 0.f ? exp2f(sm[w][g][0] - mm) : 0.f;
      acc += f * (c == 0 ? 0.f : c == 1 ? sm[w][g][1] : so[w][g][c - 2]);
    }
    const size_t at = static_cast<size_t>(h * G + g) * splits + split;  // ws: see AttnArgs
    if (c < 2)
      ws[static_cast<size_t>(gridDim.x) * G * splits * D + at * 2 + c] = c == 0 ? mm : acc;
    else
      ws[at * D + c - 2] = acc;
  }
}

// Split s of KV head h: keys [lo + s * len, ...) of the visible range [lo, pos]. Each warp takes
// kAttnBatch keys at a time, lanes over the head dimension (E = D / 32 values each); online
// softmax per query head in base 2. The warps' states are merged in shared memory and written
// to ws (o[D] and (m, l) per query head, vptq.h AttnArgs); attn_combine_kernel merges the splits.
// A warp's keys and values come in two buffers: the loads of its next batch are issued before
// it works on the current one, so at a long context every warp has two batches in flight
// (csrc/KERNELS.md, session 36: with one, the warps waited a DRAM round trip a batch).
// h counts groups of G query heads: where more than G heads share a KV head (R groups of G
// each, attn_block_heads), the blocks of its R groups read the same keys, the second read
// mostly from L2.
template <typename T, int D, int G, int W, int R>
__global__ void __launch_bounds__(W * 32) attn_split_kernel(
    const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    const int64_t* __restrict__ pos, float* __restrict__ ws, int S, int window, float scale,
    bool preload) {
  pdl_trigger();
  constexpr int E = D / 32;
  constexpr int U = kAttnBatch;
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // pos changes only after the step's last layer, and the keys before it were written by
  // earlier steps: both are read before the wait for the previous kernel (rope_kv, which writes
  // q and the key at pos), so the first batch of keys rides with that kernel's end.
  const int p = static_cast<int>(*pos);
  const int lo = window > 0 ? max(0, p - window + 1) : 0;
  const int n = p + 1 - lo;
  const int len = (n + splits - 1) / splits;
  const int k0 = lo + split * len, k1 = min(lo + n, k0 + len);
  const T* kh = kc + static_cast<size_t>(h / R) * S * D + lane * E;
  const T* vh = vc + static_cast<size_t>(h / R) * S * D + lane * E;
  RawRow<E> kb[2][U], vb[2][U];  // indexed by constants only: registers
  const auto load_keys = [&](int b0, RawRow<E>(&kr)[U], RawRow<E>(&vr)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = min(b0 + u, k1 - 1);  // past the end: a repeat, masked below
      kr[u] = load_row<T, E>(kh + static_cast<size_t>(key) * D);
      vr[u] = load_row<T, E>(vh + static_cast<size_t>(key) * D);
    }
  };
  constexpr int kStride = W * U;  // keys between a warp's batches
  const int first = k0 + warp * U;
  const bool early = preload && first < k1 && min(first + U - 1, k1 - 1) < p;
  if (early) load_keys(first, kb[0], vb[0]);
  pdl_wait();  // q and the key at pos come from the previous kernel (vptq_device.cuh)
  if (!early && first < k1) load_keys(first, kb[0], vb[0]);

  float qv[G][E], o[G][E], m[G], l[G];
  const float qs = scale * 1.4426950408889634f;  // softmax in base 2
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float raw[E];
    load_code<T, E>(q + static_cast<size_t>(h * G + g) * D + lane * E, raw);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[g][e] = raw[e] * qs;
      o[g][e] = 0.f;
    }
    m[g] = -FLT_MAX;
    l[g] = 0.f;
  }
  const auto attend = [&](int base, const RawRow<E>(&kr)[U], const RawRow<E>(&vr)[U]) {
    float kv[U][E], vv[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      unpack_row<T, E>(kr[u], kv[u]);
      unpack_row<T, E>(vr[u], vv[u]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float sc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc = fmaf(qv[g][e], kv[u][e], acc);
        sc[u] = acc;
      }
#pragma unroll
      for (int d = 16; d > 0; d >>= 1)
#pragma unroll
        for (int u = 0; u < U; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], d);
      float mn = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + u >= k1) sc[u] = -INFINITY;
        mn = fmaxf(mn, sc[u]);
      }
      const float corr = exp2f(m[g] - mn);
      float pr[U], psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pr[u] = exp2f(sc[u] - mn);
        psum += pr[u];
      }
      l[g] = l[g] * corr + psum;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        float acc = o[g][e] * corr;
#pragma unroll
        for (int u = 0; u < U; ++u) acc = fmaf(pr[u], vv[u][e], acc);
        o[g][e] = acc;
      }
      m[g] = mn;
    }
  };
  // two batches a turn, so that each buffer keeps its registers: the next batch's loads go out
  // before the current one is worked on
  for (int base = first; base < k1; base += 2 * kStride) {
    const int next = base + kStride;
    if (next < k1) load_keys(next, kb[1], vb[1]);
    attend(base, kb[0], vb[0]);
    if (next >= k1) break;
    if (next + kStride < k1) load_keys(next + kStride, kb[0], vb[0]);
    attend(next, kb[1], vb[1]);
  }
  // Merge the warps: each output value takes the others' states from shared memory.
  __shared__ float sm[W][G][2];
  __shared__ float so[W][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      sm[warp][g][0] = m[g];
      sm[warp][g][1] = l[g];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) so[warp][g][lane * E + e] = o[g][e];
  }
  __syncthreads();
  merge_warps<W, G, D>(sm, so, ws, h, split, splits);
}

// ---- Decode attention on the tensor cores (compute capability 8.0 and later) ----
// Where several blocks of four query heads read the same keys (Llama-3.1-70B's eight heads a KV
// head), the CUDA-core kernel's pace a block, not the read rate, bounds it at long contexts
// (csrc/KERNELS.md, session 36). This kernel takes all G query heads of a KV head in one block
// (kMmaWarps warps, each taking 16 keys of the split at a time): the G heads are the rows of an
// m16n8k16 A fragment (padded with zero rows), S = Q K^T in fp32, the online softmax on S's
// rows, then O += P V with P as the A fragment straight from S's accumulators. The head
// dimension is permuted within each product (the same map for both operands, so the sums are
// unchanged) so that every lane loads whole 16-byte pieces of key and value rows from global
// memory, no shared memory in the loop: for S a lane (gid, tig) takes dims tig D/4 .. + D/4 of
// key gid (k-step kk, slot s: dim tig D/4 + 4 kk + s), for P V dims gid D/8 .. + D/8 of four
// keys (output column n of d-tile t: dim n D/8 + t). The warps' states meet in shared memory
// and go to ws as attn_split_kernel's do; attn_combine_kernel merges the splits.
// Everything after the wait is loaded through L2 (ld.global.cg): q and the key at pos are
// written by the previous kernel while this one may already run (under VPTQ_ATTN_TC_PDL=1),
// which the read-only path (.nc) does not allow for.
constexpr int kMmaWarps = 4;

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host launches this kernel from compute capability 8.0 only
#endif
}

// Two floats rounded to T, packed as the halves of one word (lo first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_f<T>(lo), h = from_f<T>(hi);
  return static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(l)) |
         (static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(h)) << 16);
}

// N 16-byte pieces from p into w (4 N words), through L2.
template <int N>
__device__ __forceinline__ void load_words_cg(const void* p, uint32_t* w) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint4 u = __ldcg(reinterpret_cast<const uint4*>(p) + i);
    w[4 * i] = u.x;
    w[4 * i + 1] = u.y;
    w[4 * i + 2] = u.z;
    w[4 * i + 3] = u.w;
  }
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kMmaWarps * 32) attn_mma_kernel(
    const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    const int64_t* __restrict__ pos, float* __restrict__ ws, int S, int window, float scale) {
  static_assert(G <= 16 && (D == 64 || D == 128), "16 query heads, head dims 64 and 128");
  pdl_trigger();
  constexpr int KK = D / 16;  // k-steps of S = Q K^T
  constexpr int KW = D / 8;   // words of its key row a lane holds (D / 4 values)
  constexpr int NT = D / 8;   // d-tiles of P V
  constexpr int VW = D / 16;  // words of each of its four keys' value rows a lane holds
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
  const int p = static_cast<int>(*pos);  // changes only after the step's last layer
  const int lo = window > 0 ? max(0, p - window + 1) : 0;
  const int n = p + 1 - lo;
  const int len = (n + splits - 1) / splits;
  const int k0 = lo + split * len, k1 = min(lo + n, k0 + len);
  const T* kh = kc + static_cast<size_t>(h) * S * D;
  const T* vh = vc + static_cast<size_t>(h) * S * D;
  pdl_wait();  // q and the key at pos come from the previous kernel (rope_kv)

  // Q as A fragments: rows gid and gid + 8 (query heads h G + row, zero past G)
  uint32_t qa[KK][4];
  {
    uint32_t w0[KW], w1[KW];
#pragma unroll
    for (int i = 0; i < KW; ++i) w0[i] = w1[i] = 0u;
    if (gid < G)
      load_words_cg<KW / 4>(q + static_cast<size_t>(h * G + gid) * D + tig * (D / 4), w0);
    if (gid + 8 < G)
      load_words_cg<KW / 4>(q + static_cast<size_t>(h * G + gid + 8) * D + tig * (D / 4), w1);
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      qa[kk][0] = w0[2 * kk];
      qa[kk][1] = w1[2 * kk];
      qa[kk][2] = w0[2 * kk + 1];
      qa[kk][3] = w1[2 * kk + 1];
    }
  }
  const float qs = scale * 1.4426950408889634f;  // softmax in base 2, applied to S in fp32
  float o[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m0 = -FLT_MAX, m1 = -FLT_MAX, l0 = 0.f, l1 = 0.f;  // rows gid and gid + 8; l: this lane's

  for (int c0 = k0 + warp * 16; c0 < k1; c0 += kMmaWarps * 16) {
    uint32_t kw[2][KW], vw[4][VW];
#pragma unroll
    for (int t = 0; t < 2; ++t) {  // S's two n-tiles: keys c0 + 8 t + gid
      const int key = min(c0 + 8 * t + gid, k1 - 1);  // past the end: a repeat, masked below
      load_words_cg<KW / 4>(kh + static_cast<size_t>(key) * D + tig * (D / 4), kw[t]);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // keys c0 + 2 tig + {0, 1, 8, 9}
      const int key = min(c0 + 2 * tig + (r & 1) + 8 * (r >> 1), k1 - 1);
      load_words_cg<VW / 4>(vh + static_cast<size_t>(key) * D + gid * (D / 8), vw[r]);
    }
    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) mma16816<T>(sc[t], qa[kk], kw[t][2 * kk], kw[t][2 * kk + 1]);
    }
    // scale, mask keys past the split's end, the rows' maxima over the 16 keys
    float b0 = -INFINITY, b1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool in = c0 + 8 * t + 2 * tig + j < k1;
        sc[t][j] = in ? sc[t][j] * qs : -INFINITY;
        sc[t][2 + j] = in ? sc[t][2 + j] * qs : -INFINITY;
        b0 = fmaxf(b0, sc[t][j]);
        b1 = fmaxf(b1, sc[t][2 + j]);
      }
#pragma unroll
    for (int d = 1; d < 4; d <<= 1) {
      b0 = fmaxf(b0, __shfl_xor_sync(0xffffffffu, b0, d));
      b1 = fmaxf(b1, __shfl_xor_sync(0xffffffffu, b1, d));
    }
    const float n0 = fmaxf(m0, b0), n1 = fmaxf(m1, b1);
    const float corr0 = exp2f(m0 - n0), corr1 = exp2f(m1 - n1);
    m0 = n0;
    m1 = n1;
    float pr[2][4];
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        pr[t][j] = exp2f(sc[t][j] - n0);
        pr[t][2 + j] = exp2f(sc[t][2 + j] - n1);
        s0 += pr[t][j];
        s1 += pr[t][2 + j];
      }
    l0 = l0 * corr0 + s0;
    l1 = l1 * corr1 + s1;
    // P as the A fragment of P V (k = the 16 keys): S's accumulators, rounded to T
    const uint32_t pa[4] = {pack2<T>(pr[0][0], pr[0][1]), pack2<T>(pr[0][2], pr[0][3]),
                            pack2<T>(pr[1][0], pr[1][1]), pack2<T>(pr[1][2], pr[1][3])};
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      o[t][0] *= corr0;
      o[t][1] *= corr0;
      o[t][2] *= corr1;
      o[t][3] *= corr1;
      // B: value dim gid D/8 + t of keys 2 tig + {0, 1} (b0) and 2 tig + 8 + {0, 1} (b1)
      const int w = t / 2;
      const uint32_t sel = (t & 1) ? 0x7632u : 0x5410u;
      const uint32_t vb0 = __byte_perm(vw[0][w], vw[1][w], sel);
      const uint32_t vb1 = __byte_perm(vw[2][w], vw[3][w], sel);
      mma16816<T>(o[t], pa, vb0, vb1);
    }
  }
  // each row's sum over the lanes of its group, then the warps' states merged in shared memory
#pragma unroll
  for (int d = 1; d < 4; d <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, d);
    l1 += __shfl_xor_sync(0xffffffffu, l1, d);
  }
  __shared__ float sm[kMmaWarps][G][2];
  __shared__ float so[kMmaWarps][G][D];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int g = gid + 8 * half;
    if (g < G) {
      if (tig == 0) {
        sm[warp][g][0] = half ? m1 : m0;
        sm[warp][g][1] = half ? l1 : l0;
      }
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int j = 0; j < 2; ++j) so[warp][g][(2 * tig + j) * (D / 8) + t] = o[t][2 * half + j];
    }
  }
  __syncthreads();
  merge_warps<kMmaWarps, G, D>(sm, so, ws, h, split, splits);
}

// Query head h: the splits' states merged, o / l written in the activation dtype. D / 2
// threads, a pair of neighbouring lanes for each four values: one sums the even splits, the
// other the odd ones, each with the loads of up to kCombineBatch splits issued together, before
// the weights are known; warp 0 meanwhile turns the splits' (m, l) into weights in shared
// memory. Every round of L2 latency here is on the decode step's critical path: 512 threads,
// each summing a quarter of the splits of one value, with ws as [H, splits, D + 2] (no 16-byte
// loads), cost the 8B step about 15 us more (csrc/KERNELS.md, session 14).
constexpr int kCombineBatch = 18;  // splits a lane loads at once: one round up to 36 splits

template <typename T, int D>
__global__ void __launch_bounds__(D / 2) attn_combine_kernel(const float* __restrict__ ws,
                                                            T* __restrict__ out, int splits) {
  static_assert(kMaxSplits % 32 == 0 && D % 64 == 0, "whole warps: splits by 32, lane pairs");
  pdl_trigger();
  pdl_wait();  // inputs come from the previous kernel (vptq_device.cuh)
  __shared__ float wt[kMaxSplits];
  const int h = blockIdx.x, lane = threadIdx.x % 32, pi = threadIdx.x & 1;
  const int d = (threadIdx.x / 2) * 4;
  const float* o = ws + static_cast<size_t>(h) * splits * D + d;  // ws: see AttnArgs
  float4 ov[kCombineBatch];
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j) {
    const int sp = pi + 2 * j;
    ov[j] = sp < splits ? __ldcg(reinterpret_cast<const float4*>(o + sp * D))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (threadIdx.x < 32) {
    const float* ml = ws + (static_cast<size_t>(gridDim.x) * D + 2 * h) * splits;
    constexpr int R = kMaxSplits / 32;
    float ms[R], ls[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int sp = lane + 32 * i;
      ms[i] = sp < splits ? ml[2 * sp] : -FLT_MAX;
      ls[i] = sp < splits ? ml[2 * sp + 1] : 0.f;
    }
    float mm = -FLT_MAX;
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (ls[i] > 0.f) mm = fmaxf(mm, ms[i]);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, m));
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      ms[i] = ls[i] > 0.f ? exp2f(ms[i] - mm) : 0.f;  // the split's weight before 1 / l
      l += ls[i] * ms[i];
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) l += __shfl_xor_sync(0xffffffffu, l, m);
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (lane + 32 * i < splits) wt[lane + 32 * i] = ms[i] / l;
  }
  __syncthreads();
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const auto add = [&](const float4& v, float w) {
    acc.x = fmaf(v.x, w, acc.x);
    acc.y = fmaf(v.y, w, acc.y);
    acc.z = fmaf(v.z, w, acc.z);
    acc.w = fmaf(v.w, w, acc.w);
  };
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j)
    if (pi + 2 * j < splits) add(ov[j], wt[pi + 2 * j]);
  for (int sp = pi + 2 * kCombineBatch; sp < splits; sp += 2)  // more splits than a batch
    add(*reinterpret_cast<const float4*>(o + sp * D), wt[sp]);
  float4 odd;  // the odd splits' sums, from the neighbouring lane
  odd.x = __shfl_xor_sync(0xffffffffu, acc.x, 1);
  odd.y = __shfl_xor_sync(0xffffffffu, acc.y, 1);
  odd.z = __shfl_xor_sync(0xffffffffu, acc.z, 1);
  odd.w = __shfl_xor_sync(0xffffffffu, acc.w, 1);
  if (pi == 0) {
    const T v4[4] = {from_f<T>(acc.x + odd.x), from_f<T>(acc.y + odd.y),
                     from_f<T>(acc.z + odd.z), from_f<T>(acc.w + odd.w)};
    *reinterpret_cast<uint2*>(out + static_cast<size_t>(h) * D + d) =
        *reinterpret_cast<const uint2*>(v4);
  }
}

// One block per id; 16-byte copies where `wide` (launch_embed_rows: both tensors 16-byte
// aligned and rows of a multiple of 8 values, so every row start is aligned too).
__global__ void embed_rows_kernel(const uint16_t* __restrict__ table,
                                  const int64_t* __restrict__ ids, uint16_t* __restrict__ out,
                                  int64_t vocab, int64_t hidden, bool wide) {
  const int64_t id = ids[blockIdx.x];
  uint16_t* dst = out + blockIdx.x * hidden;
  const bool valid = id >= 0 && id < vocab;
  const uint16_t* src = table + (valid ? id : 0) * hidden;
  if (wide) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = valid ? s[i] : zero;
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = valid ? src[i] : 0;
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ g, Parts gp, const T* __restrict__ u,
                                Parts up, T* __restrict__ out, int64_t n) {
  pdl_trigger();
  pdl_wait();  // inputs come from the previous kernel (vptq_device.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* ys[2] = {g, u};
    const Parts ps[2] = {gp, up};
    const size_t at[2] = {static_cast<size_t>(i), static_cast<size_t>(i)};
    float gu[2];
    acts<T, 2>(ys, ps, at, gu);  // gate's and up's terms in flight together
    const float a = gu[0];
    const float s = to_f(from_f<T>(a / (1.f + expf(-a))));  // F.silu rounds to the dtype
    out[i] = from_f<T>(s * gu[1]);
  }
}

// The greedy pick that ends a decode step: token = argmax(logits) (the first of equal maxima, a
// NaN counting as the largest: torch.argmax), then seen[token] = true and pos += 1, in one
// launch where PyTorch took nine small kernels (a cast, the two stages of
// engine/sampling.py argmax, a gather, index arithmetic, index_fill_, copy_, add_). Block b
// takes values [b * per, (b + 1) * per) and writes its best (value, index) to ws; the last
// block to finish (a ticket, which it leaves zero) picks among those.
constexpr int kPickThreads = 512;
constexpr int kPickMaxBlocks = kPickThreads;  // the last block takes one block's best a thread

struct Best {
  float v;
  int64_t i;
};

// Whether a beats b: a NaN first, then the larger value, then the lower index.
__device__ __forceinline__ bool beats(const Best& a, const Best& b) {
  if (isnan(a.v) || isnan(b.v)) return isnan(a.v) && (!isnan(b.v) || a.i < b.i);
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Best warp_best(Best x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    Best o;
    o.v = __shfl_xor_sync(0xffffffffu, x.v, d);
    o.i = __shfl_xor_sync(0xffffffffu, x.i, d);
    if (beats(o, x)) x = o;
  }
  return x;
}

__device__ __forceinline__ Best block_best(Best x, Best* red) {
  x = warp_best(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < static_cast<int>(blockDim.x / 32) ? red[lane] : Best{-INFINITY, INT64_MAX};
  return warp_best(x);  // every warp holds the block's best
}

template <typename T>
__global__ void __launch_bounds__(kPickThreads) greedy_pick_kernel(
    const T* __restrict__ logits, int64_t V, int64_t per, bool wide, float* __restrict__ wv,
    int64_t* __restrict__ wi, int* __restrict__ ticket, int64_t* __restrict__ token,
    bool* __restrict__ seen, int64_t* __restrict__ pos) {
  pdl_trigger();
  pdl_wait();  // the logits come from the previous kernel (vptq_device.cuh)
  __shared__ Best red[kPickThreads / 32];
  __shared__ bool last;
  const int64_t lo = blockIdx.x * per, hi = min(V, lo + per);
  Best best{-INFINITY, INT64_MAX};  // beaten by any value, -inf included (lower index)
  if (wide) {  // 8 values a load (V and the block's range multiples of 8, 16-byte aligned)
    for (int64_t i = lo + threadIdx.x * 8; i < hi; i += kPickThreads * 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(logits + i);
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const Best c{to_f(h[e]), i + e};
        if (beats(c, best)) best = c;
      }
    }
  } else {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kPickThreads) {
      const Best c{to_f(logits[i]), i};
      if (beats(c, best)) best = c;
    }
  }
  best = block_best(best, red);
  if (threadIdx.x == 0) {
    wv[blockIdx.x] = best.v;
    wi[blockIdx.x] = best.i;
    __threadfence();  // this block's best is visible before its ticket
    last = atomicAdd(ticket, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  Best b{-INFINITY, INT64_MAX};
  if (threadIdx.x < gridDim.x) b = Best{__ldcg(wv + threadIdx.x), __ldcg(wi + threadIdx.x)};
  __syncthreads();  // red[] is reused
  b = block_best(b, red);
  if (threadIdx.x == 0) {
    *token = b.i;
    seen[b.i] = true;
    *pos += 1;
    *ticket = 0;  // ready for the next step
  }
}

// The sampled pick that ends a decode step with a repetition penalty, temperature, top-k, top-p
// and min-p (engine/sampling.py sample): of the tokens top-k, top-p and min-p keep, token =
// argmax(p / noise) (noise ~ Exp(1), drawn by PyTorch from the chat's generator: a draw from
// the kept tokens' distribution), then seen[token] = true and pos += 1. PyTorch took a sort
// of the whole vocabulary and about fifteen kernels for it.
//
// One cluster of kSampleCluster blocks (compute capability 9.0); block b holds values
// [b * per, (b + 1) * per) in shared memory, and the blocks exchange their partial results by
// writing them into every block's shared memory, one cluster barrier an exchange:
// 1. l = the logit, divided by the penalty where seen and positive, else multiplied by it;
//    x = l / temperature; the maximum M (NaN ignored). Temperature 0: the greedy pick of l.
// 2. p = exp(x - M) (1 for the largest; 0 where p < min_p or NaN) and the total S.
// 3. top-k keeps a token when its p is at least the top_k-th largest (ties together); top-p
//    when the mass of the tokens with a strictly larger p is below P = top_p * S (ties kept
//    or dropped together; engine/sampling.py filter_probs reads both so).
//    p >= 0, so p's bit pattern k orders the tokens as p does; the kept ones are those with
//    k >= cut, where cut + 1 is the smallest c with H(c) = mass (or count) of {k >= c}
//    below P (or top_k). Six rounds find each cut (fewer once the range left holds a single
//    key), each splitting the range left into 32 bins (5 bits of k) and summing the mass per
//    bin across the cluster: each thread into its own column of a shared-memory histogram (no
//    atomics; a flat row puts thousands of values into one bin, and 64-bit shared atomics,
//    compare-and-swap loops, took 132 us a pick that way), then each warp one bin.
// 4. The kept token with the largest p / noise (the first of equals); block 0 writes it.
// Every sum runs in a fixed order (doubles across threads), so a seeded chat draws the same
// tokens on every run. Where no token has positive p (all logits -inf or NaN, or one +inf),
// the pick is greedy.
constexpr int kSampleCluster = 8;
constexpr int kSampleThreads = 1024;
[[maybe_unused]] constexpr int kSampleBins = 32;
static_assert(kSampleThreads == 32 * kSampleBins, "a warp per bin");
constexpr int kSampleHist = kSampleBins * kSampleThreads * 4;  // bytes: a column a thread
constexpr int kSampleMaxPer = 22 * 1024;  // values a block (with the histogram, 216 KiB)
[[maybe_unused]] constexpr int kSampleBatch = 8;  // global loads in flight a thread

[[maybe_unused]] __device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  return m;
}

[[maybe_unused]] __device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_pick_kernel(
    const T* __restrict__ logits, const float* __restrict__ noise, int64_t V, int per,
    float temperature, double top_p, float min_p, int64_t top_k, float penalty,
    const double* __restrict__ params, int64_t* __restrict__ token, bool* __restrict__ seen,
    int64_t* __restrict__ pos) {
  pdl_trigger();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // This block has started: the others may write into its shared memory once they have seen
  // every block arrive here (the wait before the first exchange).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  extern __shared__ __align__(16) unsigned char sample_smem[];
  float* hist = reinterpret_cast<float*>(sample_smem);               // [bin][thread]
  float* pv = reinterpret_cast<float*>(sample_smem + kSampleHist);  // this block's x, then p
  __shared__ float redf[kSampleThreads / 32];
  __shared__ double redd[kSampleThreads / 32];
  __shared__ Best redb[kSampleThreads / 32];
  // What the blocks send each other: slot [rank] of every block's copy.
  __shared__ float all_max[kSampleCluster];
  __shared__ Best all_greedy[kSampleCluster];
  __shared__ double all_sum[kSampleCluster];
  __shared__ double all_hist[2][kSampleCluster][kSampleBins];  // rounds alternate
  __shared__ uint32_t all_keys[2][2][kSampleCluster];  // [round & 1][min, max][rank]
  __shared__ uint32_t redk[2][kSampleThreads / 32];
  __shared__ Best all_best[kSampleCluster];
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t base = static_cast<int64_t>(rank) * per;
  const int n = static_cast<int>(V - base < 0 ? 0 : V - base < per ? V - base : per);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Sends v to slot `rank` of every block's copy of `slots` (threads 0 .. kSampleCluster - 1).
  const auto send = [&](auto* slots, auto v) {
    if (threadIdx.x < kSampleCluster) *cluster.map_shared_rank(&slots[rank], threadIdx.x) = v;
  };
  pdl_wait();  // the noise comes from the previous kernel, the logits from an earlier one
  if (params != nullptr) {  // the settings from the GPU: a CUDA graph replays with new ones
    temperature = static_cast<float>(params[0]);
    top_p = params[1];
    min_p = static_cast<float>(params[2]);
    top_k = static_cast<int64_t>(params[3]);
    penalty = static_cast<float>(params[4]);
  }
  const bool greedy_only = !(temperature > 0.f);
  // Thread 0 of block 0 ends the step with the greedy pick (of the penalised logits).
  const auto pick_greedy = [&]() {
    if (rank == 0 && threadIdx.x == 0) {
      Best b = all_greedy[0];
      for (int r = 1; r < kSampleCluster; ++r)
        if (beats(all_greedy[r], b)) b = all_greedy[r];
      *token = b.i;
      seen[b.i] = true;
      *pos += 1;
    }
  };

  // 1. x and its maximum; the greedy pick too, for a row without positive p. Thread t takes
  // values t, t + kSampleThreads, ..., kSampleBatch loads at a time.
  float mx = -INFINITY;
  Best greedy{-INFINITY, INT64_MAX};
  const bool penalised = penalty != 1.f;
  for (int i0 = threadIdx.x; i0 < n; i0 += kSampleBatch * kSampleThreads) {
    float raw[kSampleBatch];
    bool was[kSampleBatch];
#pragma unroll
    for (int u = 0; u < kSampleBatch; ++u) {
      const int i = i0 + u * kSampleThreads;
      raw[u] = i < n ? to_f(logits[base + i]) : -INFINITY;
      was[u] = penalised && i < n && seen[base + i];
    }
#pragma unroll
    for (int u = 0; u < kSampleBatch; ++u) {
      const int i = i0 + u * kSampleThreads;
      if (i < n) {
        if (was[u]) raw[u] = raw[u] > 0.f ? raw[u] / penalty : raw[u] * penalty;
        const Best c{raw[u], base + i};
        if (beats(c, greedy)) greedy = c;
        const float x = raw[u] / temperature;
        pv[i] = x;
        mx = fmaxf(mx, x);
      }
    }
  }
  mx = block_max(mx, redf);
  greedy = block_best(greedy, redb);
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  send(all_max, mx);
  send(all_greedy, greedy);
  cluster.sync();
  if (greedy_only) {  // temperature 0 (every block takes this branch)
    pick_greedy();
    return;
  }
  float M = -INFINITY;
  for (int b = 0; b < kSampleCluster; ++b) M = fmaxf(M, all_max[b]);

  // 2. p and the total.
  float mine = 0.f;
  for (int i = threadIdx.x; i < n; i += kSampleThreads) {
    float p = expf(pv[i] - M);
    if (!(p >= min_p)) p = 0.f;  // NaN too
    pv[i] = p;
    mine += p;
  }
  {
    const double w = warp_sum_d(mine);
    if (lane == 0) redd[warp] = w;
    __syncthreads();
    double b = 0.0;
    for (int k = 0; k < kSampleThreads / 32; ++k) b += redd[k];
    send(all_sum, b);
  }
  cluster.sync();
  double S = 0.0;
  for (int b = 0; b < kSampleCluster; ++b) S += all_sum[b];
  if (!(S > 0.0)) {  // nothing to sample from: the greedy pick (every block takes this branch)
    pick_greedy();
    return;
  }

  // 3. The cuts. A search finds the largest key c with F(c) >= need, where F(c) sums w over the
  // tokens with p > 0 and key >= c (F falls as c rises): rounds of 32 bins over
  // [lo, lo + 32 << shift), knowing F(lo) >= need and F(lo + (32 << shift)) = above < need.
  // Keys of p <= 1 lie below 2^30. Top-p: w = p, need = P (mass); top-k: w = 1, need = top_k
  // (a count, exact in floats and doubles). Where F(0) < need every round keeps lo at 0.
  int round = 0;  // across both searches: rounds alternate their exchange slots
  const auto search = [&](bool counting, double need) -> uint32_t {
    uint32_t lo = 0;
    double above = 0.0;
    float* col = hist + threadIdx.x;
#pragma unroll 1
    for (int shift = 25; shift >= 0; ++round, shift -= 5) {
      const uint32_t span = static_cast<uint32_t>(kSampleBins) << shift;
#pragma unroll
      for (int b = 0; b < kSampleBins; ++b) col[b * kSampleThreads] = 0.f;
      uint32_t kmin = 0xFFFFFFFFu, kmax = 0;  // the range's keys: one alone ends the search
      for (int i = threadIdx.x; i < n; i += kSampleThreads) {
        const float p = pv[i];
        const uint32_t key = __float_as_uint(p), k = key - lo;  // below lo: wraps past span
        if (k < span && p > 0.f) {
          col[(k >> shift) * kSampleThreads] += counting ? 1.f : p;
          kmin = min(kmin, key);
          kmax = max(kmax, key);
        }
      }
      kmin = __reduce_min_sync(0xffffffffu, kmin);
      kmax = __reduce_max_sync(0xffffffffu, kmax);
      if (lane == 0) {
        redk[0][warp] = kmin;
        redk[1][warp] = kmax;
      }
      __syncthreads();
      double (*slots)[kSampleBins] = all_hist[round & 1];
      uint32_t (*keys)[kSampleCluster] = all_keys[round & 1];
      {
        const float* row = hist + warp * kSampleThreads;  // warp w sums bin w
        double h = 0.0;
#pragma unroll 8
        for (int k = lane; k < kSampleThreads; k += 32) h += row[k];
        h = warp_sum_d(h);
        if (lane < kSampleCluster) *cluster.map_shared_rank(&slots[rank][warp], lane) = h;
        if (warp == 0) {
          kmin = __reduce_min_sync(0xffffffffu, redk[0][lane]);
          kmax = __reduce_max_sync(0xffffffffu, redk[1][lane]);
          if (lane < kSampleCluster) {
            *cluster.map_shared_rank(&keys[0][rank], lane) = kmin;
            *cluster.map_shared_rank(&keys[1][rank], lane) = kmax;
          }
        }
      }
      cluster.sync();  // also: every column was read before the next round clears its own
      // All the range's tokens share one key k0: F(k0) = F(lo) >= need and F(k0 + 1) = above
      // < need, so the answer is k0, whatever the bins say (a row leaves one key in the range
      // after two or three rounds, and each round is ~3.7 us).
      kmin = 0xFFFFFFFFu;
      kmax = 0;
      for (int r = 0; r < kSampleCluster; ++r) {
        kmin = min(kmin, keys[0][r]);
        kmax = max(kmax, keys[1][r]);
      }
      if (kmin == kmax) {
        ++round;
        return kmin;
      }
      // Every warp finds the same answer: lane j holds F(lo + (j << shift)) - above as the
      // suffix sum of the bins; the first j >= 1 with F < need ends the new range.
      double bin = 0.0;
      for (int r = 0; r < kSampleCluster; ++r) bin += slots[r][lane];
      double suffix = bin;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const double o = __shfl_down_sync(0xffffffffu, suffix, d);
        if (lane + d < 32) suffix += o;
      }
      const unsigned below = __ballot_sync(0xffffffffu, lane >= 1 && above + suffix < need);
      const int j = below ? __ffs(below) - 1 : 32;
      const double at_j = __shfl_sync(0xffffffffu, suffix, j & 31);
      if (j < 32) above += at_j;
      lo += static_cast<uint32_t>(j - 1) << shift;
    }
    return lo;  // after shift 0: lo + 1 is the smallest c with F(c) < need
  };
  // Top-k keeps the tokens whose p is at least the top_k-th largest (ties together, as
  // Hugging Face's top-k); top-p those with less than P of mass strictly above them. A token
  // is kept where both keep it: its key is at least both cuts.
  uint32_t cut = 1;  // every token with p > 0
  if (top_k > 0 && top_k < V) cut = search(true, static_cast<double>(top_k));
  if (top_p < 1.0) cut = max(cut, search(false, top_p * S));

  // 4. The draw among the kept tokens.
  Best best{-INFINITY, INT64_MAX};
  for (int i0 = threadIdx.x; i0 < n; i0 += kSampleBatch * kSampleThreads) {
    float e[kSampleBatch];
#pragma unroll
    for (int u = 0; u < kSampleBatch; ++u) {
      const int i = i0 + u * kSampleThreads;
      e[u] = i < n ? noise[base + i] : 1.f;
    }
#pragma unroll
    for (int u = 0; u < kSampleBatch; ++u) {
      const int i = i0 + u * kSampleThreads;
      if (i < n) {
        const float p = pv[i];
        if (p > 0.f && __float_as_uint(p) >= cut) {
          const Best c{p / e[u], base + i};
          if (beats(c, best)) best = c;
        }
      }
    }
  }
  best = block_best(best, redb);
  if (threadIdx.x == 0) *cluster.map_shared_rank(&all_best[rank], 0) = best;
  cluster.sync();
  if (rank == 0 && threadIdx.x == 0) {
    Best b = all_best[0];
    for (int r = 1; r < kSampleCluster; ++r)
      if (beats(all_best[r], b)) b = all_best[r];
    *token = b.i;
    seen[b.i] = true;
    *pos += 1;
  }
#else
  pdl_wait();
#endif
}

// VPTQ_ATTN_PRELOAD=0: the first keys are loaded after the wait (for comparisons).
bool attn_preload() {
  static const bool on = !switched_off("VPTQ_ATTN_PRELOAD");
  return on;
}

// Eight warps a split where G * D <= 512 (Llama-3.1-8B's 4 x 128: at position 600 the 19 keys of
// a split are all loaded before the wait, where four warps took a second round of key loads
// after it; at 3000, 3 rounds instead of 6), else four: csrc/KERNELS.md, session 14. G: the
// query heads of a block (attn_block_heads), R: blocks for each KV head.
// The tensor-core kernel is launched without PDL, so its blocks are placed on an idle GPU, two
// an SM as decode_attention_splits plans. With PDL, in a 70B decode graph at position 32704 it
// cost the step 87.6 us a layer (the CUDA cores' kernel 89.8), without 57.8 (H100,
// csrc/KERNELS.md session 48): launched early, its blocks go to the SMs as the previous kernel
// frees them, and three fit an SM (166 registers a thread), so the SMs freed first can take three
// and others fewer. The CUDA-core kernel's two blocks fill an SM's registers: it keeps PDL.
// VPTQ_ATTN_TC_PDL=1: launched with PDL (for comparisons).
bool attn_tc_pdl() {
  static const bool on = switched_on("VPTQ_ATTN_TC_PDL");
  return on;
}

template <typename T, int D, int G, int R = 1>
cudaError_t attn_typed(const AttnArgs& a, cudaStream_t stream) {
  static_assert(attn_block_heads(G * R) == G, "blocks of attn_block_heads query heads");
  constexpr int W = G * D <= 512 ? 8 : kAttnWarps;
  cudaError_t err = cudaSuccess;
  if (a.tensor_cores) {  // all G R query heads of a KV head in one block
    const auto kernel = attn_mma_kernel<T, D, G * R>;
    const dim3 grid(a.Hkv, a.splits), block(kMmaWarps * 32);
    const auto* q = static_cast<const T*>(a.q);
    const auto* kc = static_cast<const T*>(a.k_cache);
    const auto* vc = static_cast<const T*>(a.v_cache);
    if (attn_tc_pdl()) {
      err = launch_pdl(kernel, grid, block, 0, stream, q, kc, vc, a.pos, a.ws, a.S, a.window,
                       a.scale);
    } else {
      kernel<<<grid, block, 0, stream>>>(q, kc, vc, a.pos, a.ws, a.S, a.window, a.scale);
      err = cudaGetLastError();
    }
    if (err != cudaSuccess) return err;
    return launch_pdl(attn_combine_kernel<T, D>, dim3(a.H), dim3(D / 2), 0, stream,
                      static_cast<const float*>(a.ws), static_cast<T*>(a.out), a.splits);
  }
  err = launch_pdl(
      attn_split_kernel<T, D, G, W, R>, dim3(a.Hkv * R, a.splits), dim3(W * 32), 0, stream,
      static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.pos, a.ws, a.S, a.window, a.scale, attn_preload());
  if (err != cudaSuccess) return err;
  return launch_pdl(attn_combine_kernel<T, D>, dim3(a.H), dim3(D / 2), 0, stream,
                    static_cast<const float*>(a.ws), static_cast<T*>(a.out), a.splits);
}

template <typename T, int D>
cudaError_t attn_by_gqa(const AttnArgs& a, cudaStream_t stream) {
  switch (a.H / a.Hkv) {
    case 1: return attn_typed<T, D, 1>(a, stream);
    case 2: return attn_typed<T, D, 2>(a, stream);
    case 3: return attn_typed<T, D, 3>(a, stream);
    case 4: return attn_typed<T, D, 4>(a, stream);
    case 5: return attn_typed<T, D, 5>(a, stream);
    case 6: return attn_typed<T, D, 6>(a, stream);
    case 7: return attn_typed<T, D, 7>(a, stream);
    case 8: return attn_typed<T, D, 4, 2>(a, stream);
    case 12: return attn_typed<T, D, 4, 3>(a, stream);
    case 16: return attn_typed<T, D, 4, 4>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t attn_by_dim(const AttnArgs& a, cudaStream_t stream) {
  if (a.D == 64) return attn_by_gqa<T, 64>(a, stream);
  if (a.D == 128) return attn_by_gqa<T, 128>(a, stream);
  return cudaErrorInvalidValue;
}

// Whether add_rms_norm_parts_kernel takes these rows: compute capability 9.0 or later, H split
// evenly into the cluster's blocks, float4 terms and 4-value groups of the activations.
bool norm_parts_fits(const Parts& xp, const void* r, const void* w, const void* out,
                     const void* sum, int H) {
  if (!hopper_or_later() || r == nullptr) return false;
  const int cols = H / kNormCluster;
  uintptr_t addr = reinterpret_cast<uintptr_t>(xp.p) | (xp.stride * sizeof(float));
  uintptr_t half = reinterpret_cast<uintptr_t>(r) | reinterpret_cast<uintptr_t>(w) |
                   reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(sum);
  return H % (kNormCluster * kPartCols) == 0 && cols <= kPartThreads * kPartCols * kPartSteps &&
         addr % 16 == 0 && half % 8 == 0;
}

template <typename T>
cudaError_t rms_norm_typed(const void* x, const Parts& xp, const void* r, const void* w,
                           void* out, void* sum, int rows, int H, float eps,
                           cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(r);
  const T* wt = static_cast<const T*>(w);
  T* ot = static_cast<T*>(out);
  T* st = static_cast<T*>(sum);
  if (xp.p != nullptr && norm_parts_fits(xp, r, w, out, sum, H)) {
    const int groups = H / kNormCluster / kPartCols;  // per block
    const int steps = (groups + kPartThreads - 1) / kPartThreads;
    const dim3 block(((groups + steps - 1) / steps + 31) / 32 * 32);
    return launch_pdl_in(kNormCluster, add_rms_norm_parts_kernel<T>, dim3(kNormCluster, rows),
                         block, 0, stream, xp, rt, wt, ot, st, H, eps);
  }
  const int n_vec = H / 8;
  const int vpt = (n_vec + kNormThreads - 1) / kNormThreads;
  uintptr_t addr = 0;
  for (const void* ptr : {x, r, w, static_cast<const void*>(out), static_cast<const void*>(sum)})
    addr |= reinterpret_cast<uintptr_t>(ptr);
  const bool aligned = H % 8 == 0 && addr % 16 == 0;
  if (xp.p == nullptr && aligned && vpt <= 4) {
    const int threads = std::min(kNormThreads, ((n_vec + vpt - 1) / vpt + 31) / 32 * 32);
    auto kernel = vpt == 1   ? rms_norm_kernel<T, 1>
                  : vpt == 2 ? rms_norm_kernel<T, 2>
                  : vpt == 3 ? rms_norm_kernel<T, 3>
                             : rms_norm_kernel<T, 4>;
    return launch_pdl(kernel, dim3(rows), dim3(threads), 0, stream, xt, xp, rt, wt, ot, st, H,
                      eps);
  }
  const int threads = std::min(kNormThreads, (H + 31) / 32 * 32);
  return launch_pdl(rms_norm_kernel<T, 0>, dim3(rows), dim3(threads), 0, stream, xt, xp, rt, wt,
                    ot, st, H, eps);
}

}  // namespace

cudaError_t launch_rms_norm(const void* x, Parts xp, const void* r, const void* w, void* out,
                            void* sum, int rows, int H, float eps, DType dtype,
                            cudaStream_t stream) {
  if (dtype == DType::kHalf)
    return rms_norm_typed<__half>(x, xp, r, w, out, sum, rows, H, eps, stream);
  return rms_norm_typed<__nv_bfloat16>(x, xp, r, w, out, sum, rows, H, eps, stream);
}

cudaError_t launch_rope_kv(const RopeArgs& a, DType dtype, cudaStream_t stream) {
  const int threads = std::min(256, a.D);
  const dim3 grid(a.H + a.Hkv, a.T), block(threads);
  if (dtype == DType::kHalf)
    return launch_pdl(rope_kv_kernel<__half>, grid, block, 0, stream,
                      static_cast<const __half*>(a.q), static_cast<const __half*>(a.k),
                      static_cast<const __half*>(a.v), a.qp, a.kp, a.vp, a.cos, a.sin, a.pos,
                      static_cast<__half*>(a.q_out), static_cast<__half*>(a.k_cache),
                      static_cast<__half*>(a.v_cache), a.H, a.Hkv, a.D, a.S, a.T, a.start);
  return launch_pdl(rope_kv_kernel<__nv_bfloat16>, grid, block, 0, stream,
                    static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.k),
                    static_cast<const __nv_bfloat16*>(a.v), a.qp, a.kp, a.vp, a.cos, a.sin,
                    a.pos, static_cast<__nv_bfloat16*>(a.q_out),
                    static_cast<__nv_bfloat16*>(a.k_cache),
                    static_cast<__nv_bfloat16*>(a.v_cache), a.H, a.Hkv, a.D, a.S, a.T, a.start);
}

bool decode_attention_supported(int H, int Hkv, int D) {
  if (Hkv < 1 || H % Hkv != 0 || (D != 64 && D != 128)) return false;
  const int g = H / Hkv;
  return g <= 8 || g == 12 || g == 16;
}

bool decode_attention_tensor_cores_supported() { return compute_major() >= 8; }

int decode_attention_splits(int H, int Hkv, int S, int num_sms, bool tensor_cores) {
  // Two blocks per SM over the blocks of a split (a block per group of query heads, or per KV
  // head on the tensor cores), but no split shorter than 32 keys of the whole cache.
  const int g = H / std::max(1, Hkv);
  const int groups = std::max(1, Hkv) * (tensor_cores ? 1 : g / attn_block_heads(g));
  const int want = std::max(1, 2 * num_sms / groups);
  return std::max(1, std::min({want, (S + 31) / 32, kMaxSplits}));
}

cudaError_t launch_decode_attention(const AttnArgs& a, DType dtype, cudaStream_t stream) {
  if (!decode_attention_supported(a.H, a.Hkv, a.D) || a.splits < 1) return cudaErrorInvalidValue;
  if (a.tensor_cores && !decode_attention_tensor_cores_supported()) return cudaErrorNotSupported;
  if (dtype == DType::kHalf) return attn_by_dim<__half>(a, stream);
  return attn_by_dim<__nv_bfloat16>(a, stream);
}

cudaError_t launch_embed_rows(const void* table, const int64_t* ids, void* out, int64_t n,
                              int64_t vocab, int64_t hidden, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 0x7fffffff) return cudaErrorInvalidValue;
  // a view of a table (a slice of rows, an offset storage) may start anywhere
  const bool wide = hidden % 8 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  embed_rows_kernel<<<static_cast<unsigned>(n), 128, 0, stream>>>(
      static_cast<const uint16_t*>(table), ids, static_cast<uint16_t*>(out), vocab, hidden, wide);
  return cudaGetLastError();
}

cudaError_t launch_silu_mul(const void* g, Parts gp, const void* u, Parts up, void* out,
                            int64_t n, DType dtype, cudaStream_t stream) {
  const int threads = 256;  // 512: the same; 64, 128 and 1024: slower (KERNELS.md session 14)
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kHalf)
    return launch_pdl(silu_mul_kernel<__half>, dim3(blocks), dim3(threads), 0, stream,
                      static_cast<const __half*>(g), gp, static_cast<const __half*>(u), up,
                      static_cast<__half*>(out), n);
  return launch_pdl(silu_mul_kernel<__nv_bfloat16>, dim3(blocks), dim3(threads), 0, stream,
                    static_cast<const __nv_bfloat16*>(g), gp,
                    static_cast<const __nv_bfloat16*>(u), up, static_cast<__nv_bfloat16*>(out),
                    n);
}

// Values per block of greedy_pick_kernel: 8 a thread (one 16-byte load), more only past
// kPickMaxBlocks blocks; a multiple of 8.
static int64_t pick_per(int64_t V) {
  const int64_t fewest = (V + kPickMaxBlocks - 1) / kPickMaxBlocks;
  return (std::max<int64_t>(kPickThreads * 8, fewest) + 7) / 8 * 8;
}

int greedy_pick_blocks(int64_t V) {
  const int64_t per = pick_per(V);
  return static_cast<int>((V + per - 1) / per);
}

cudaError_t launch_greedy_pick(const void* logits, int64_t V, float* wv, int64_t* wi, int* ticket,
                               int64_t* token, bool* seen, int64_t* pos, DType dtype,
                               cudaStream_t stream) {
  if (V < 1) return cudaErrorInvalidValue;
  const int64_t per = pick_per(V);
  const dim3 grid(greedy_pick_blocks(V)), block(kPickThreads);
  const bool wide = V % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  if (dtype == DType::kHalf)
    return launch_pdl(greedy_pick_kernel<__half>, grid, block, 0, stream,
                      static_cast<const __half*>(logits), V, per, wide, wv, wi, ticket, token,
                      seen, pos);
  return launch_pdl(greedy_pick_kernel<__nv_bfloat16>, grid, block, 0, stream,
                    static_cast<const __nv_bfloat16*>(logits), V, per, wide, wv, wi, ticket,
                    token, seen, pos);
}

bool sample_pick_supported(int64_t V) {
  return V >= 1 && (V + kSampleCluster - 1) / kSampleCluster <= kSampleMaxPer;
}

cudaError_t launch_sample_pick(const void* logits, const float* noise, int64_t V,
                               float temperature, double top_p, float min_p, int64_t top_k,
                               float penalty, const double* params, int64_t* token, bool* seen,
                               int64_t* pos, DType dtype, cudaStream_t stream) {
  if (!hopper_or_later()) return cudaErrorNotSupported;
  if (!sample_pick_supported(V)) return cudaErrorInvalidValue;
  const int per = static_cast<int>((V + kSampleCluster - 1) / kSampleCluster);
  const size_t smem = kSampleHist + static_cast<size_t>(per) * sizeof(float);
  const auto go = [&](auto kernel, const auto* typed) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    return launch_pdl_in(kSampleCluster, kernel, dim3(kSampleCluster), dim3(kSampleThreads),
                         smem, stream, typed, noise, V, per, temperature, top_p, min_p, top_k,
                         penalty, params, token, seen, pos);
  };
  if (dtype == DType::kHalf)
    return go(sample_pick_kernel<__half>, static_cast<const __half*>(logits));
  return go(sample_pick_kernel<__nv_bfloat16>, static_cast<const __nv_bfloat16*>(logits));
}

}  // namespace vptq
