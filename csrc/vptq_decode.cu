// The rest of a decode step, fused: at batch 1 the projections are a third of the launches,
// and each small PyTorch kernel between them (RMSNorm alone is seven) costs a launch and a
// drain of the GPU. Measured on the H200 (session 6, `bench e2e`-built Llama-3.1-8B, one eager
// decode step under torch.profiler): 2.3 ms of the 6.8 ms step went to ~45 such kernels per
// layer. These kernels do that work in five launches per layer (csrc/KERNELS.md):
// - rms_norm / add_rms_norm: y = w * norm(x) with the residual sum x + r done on the way;
// - rope_kv: RoPE on q and k at the position held on the device, k and v written into the
//   static KV cache there;
// - decode_attention: one query token against the cache up to that position (GQA, sliding
//   window), split over the keys (flash-decoding), then the splits combined;
// - silu_mul: silu(gate) * up;
// - embed_rows: rows of an embedding table kept in pinned host memory.
// Every rounding matches the PyTorch code they replace (engine/model.py): fp32 inside, the
// activation dtype where PyTorch rounds. add_rms_norm, rope_kv and silu_mul also take their
// inputs as a sliced GEMV's partial sums (vptq.h Parts) and add them first, rounded as the
// GEMV would have written them.
#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <initializer_list>

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
  __shared__ float red[kPartThreads / 32];
  __shared__ float block_ss;
  const size_t row = static_cast<size_t>(blockIdx.y) * H;
  const int cols = H / kNormCluster, c0 = static_cast<int>(cluster.block_rank()) * cols;
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
  const float mine = block_sum(ss, red);
  if (threadIdx.x == 0) block_ss = mine;
  cluster.sync();
  float total = 0.f;
  for (int b = 0; b < kNormCluster; ++b) total += *cluster.map_shared_rank(&block_ss, b);
  cluster.sync();  // no block leaves while another still reads its block_ss
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

// Block b < H rotates query head b into q_out; block H + j rotates key head j and writes it and
// value head j into the caches at position *pos. Half-split RoPE: the first D/2 lanes pair with
// the second half, x * cos + rotate(x) * sin, each product rounded as PyTorch does.
template <typename T>
__global__ void rope_kv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, Parts qp, Parts kp, Parts vp,
                               const float* __restrict__ cos,
                               const float* __restrict__ sin, const int64_t* __restrict__ pos,
                               T* __restrict__ q_out, T* __restrict__ k_cache,
                               T* __restrict__ v_cache, int H, int D, int S) {
  pdl_trigger();
  // pos changes only after the step's last layer (as in attn_split_kernel): it and this
  // thread's first cos and sin are read before the wait, off the path behind q, k and v
  const int64_t p = *pos;
  const int d0 = threadIdx.x;
  const float c0 = d0 < D ? cos[p * D + d0] : 0.f, s0 = d0 < D ? sin[p * D + d0] : 0.f;
  pdl_wait();  // q, k and v come from the previous kernel (vptq_device.cuh)
  const int head = blockIdx.x;
  const bool is_q = head < H;
  const int j = head - H;
  const T* src = is_q ? q : k;
  const Parts sp = is_q ? qp : kp;
  const size_t at = static_cast<size_t>(is_q ? head : j) * D;  // the head's first value
  const size_t slot = (static_cast<size_t>(j) * S + p) * D;  // cache [1, Hkv, S, D]
  const int half = D / 2;
  for (int d = d0; d < D; d += blockDim.x) {
    // this value, its rotation partner and (key heads) the value head's: loads all at once
    const T* ys[3] = {src, src, v};
    const Parts ps[3] = {sp, sp, vp};
    const size_t at3[3] = {at + d, at + (d < half ? d + half : d - half),
                           static_cast<size_t>(is_q ? 0 : j) * D + d};
    float got[3];
    if (is_q)
      acts<T, 2>(ys, ps, at3, got);
    else
      acts<T, 3>(ys, ps, at3, got);
    const float xv = got[0], other = got[1];
    const float rot = d < half ? -other : other;
    const float c = d == d0 ? c0 : cos[p * D + d], s = d == d0 ? s0 : sin[p * D + d];
    const T y = from_f<T>(__fadd_rn(__fmul_rn(xv, c), __fmul_rn(rot, s)));
    if (is_q) {
      q_out[static_cast<size_t>(head) * D + d] = y;
    } else {
      k_cache[slot + d] = y;
      v_cache[slot + d] = from_f<T>(got[2]);
    }
  }
}

constexpr int kAttnWarps = 4;
constexpr int kAttnBatch = 4;       // keys a warp loads before it computes (their loads overlap)
constexpr int kMaxSplits = 256;

// Split s of KV head h: keys [lo + s * len, ...) of the visible range [lo, pos]. Each warp takes
// kAttnBatch keys at a time, lanes over the head dimension (E = D / 32 values each); online
// softmax per query head in base 2. The warps' states are merged in shared memory and written
// to ws as (m, l, o[D]) per query head; attn_combine_kernel merges the splits.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnWarps * 32) attn_split_kernel(
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
  const T* kh = kc + static_cast<size_t>(h) * S * D + lane * E;
  const T* vh = vc + static_cast<size_t>(h) * S * D + lane * E;
  float kv[U][E], vv[U][E];
  const auto load_keys = [&](int b0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = min(b0 + u, k1 - 1);  // past the end: a repeat, masked below
      load_code<T, E>(kh + static_cast<size_t>(key) * D, kv[u]);
      load_code<T, E>(vh + static_cast<size_t>(key) * D, vv[u]);
    }
  };
  const int first = k0 + warp * U;
  const bool early = preload && first < k1 && min(first + U - 1, k1 - 1) < p;
  if (early) load_keys(first);
  pdl_wait();  // q and the key at pos come from the previous kernel (vptq_device.cuh)
  if (!early && first < k1) load_keys(first);

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
  for (int base = first; base < k1; base += kAttnWarps * U) {
    if (base != first) load_keys(base);  // the first batch is loaded
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
  }
  // Merge the warps: each output value takes the others' states from shared memory.
  __shared__ float sm[kAttnWarps][G][2];
  __shared__ float so[kAttnWarps][G][D];
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
  for (int i = threadIdx.x; i < G * (D + 2); i += blockDim.x) {
    const int g = i / (D + 2), c = i % (D + 2);
    float mm = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, sm[w][g][0]);
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float f = sm[w][g][1] > 0.f ? exp2f(sm[w][g][0] - mm) : 0.f;
      acc += f * (c == 0 ? 0.f : c == 1 ? sm[w][g][1] : so[w][g][c - 2]);
    }
    // ws: [H, splits, D + 2] = (m, l, o)
    ws[(static_cast<size_t>(h * G + g) * splits + split) * (D + 2) + c] = c == 0 ? mm : acc;
  }
}

// Query head h: the splits' states merged, o / l written in the activation dtype. 512 threads:
// thread (part, d) sums o[d] over the splits s = part, part + P, ... (P = 512 / D), and issues
// those loads first, before the weights are known, while warp 0 turns the splits' (m, l),
// loaded once, into weights in shared memory; the P parts are then added in order. Measured on
// the H200 (8B at position 600, 33 splits): 3.8 us a call when each of D threads walked all
// splits and warp 0 read (m, l) twice; every round of L2 latency here is on the decode step's
// critical path.
constexpr int kCombineThreads = 512;
constexpr int kCombineBatch = 16;  // splits per thread whose loads are issued together

template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads) attn_combine_kernel(
    const float* __restrict__ ws, T* __restrict__ out, int splits) {
  pdl_trigger();
  pdl_wait();  // inputs come from the previous kernel (vptq_device.cuh)
  constexpr int P = kCombineThreads / D;
  static_assert(kMaxSplits % 32 == 0 && P * D == kCombineThreads, "combine shape");
  __shared__ float wt[kMaxSplits];
  __shared__ float part[P][D];
  const int h = blockIdx.x, d = threadIdx.x % D, pi = threadIdx.x / D;
  const float* base = ws + static_cast<size_t>(h) * splits * (D + 2);
  float ov[kCombineBatch];
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j) {
    const int sp = pi + j * P;
    ov[j] = sp < splits ? base[sp * (D + 2) + 2 + d] : 0.f;
  }
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    constexpr int R = kMaxSplits / 32;
    float ms[R], ls[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int sp = lane + 32 * i;
      ms[i] = sp < splits ? base[sp * (D + 2)] : -FLT_MAX;
      ls[i] = sp < splits ? base[sp * (D + 2) + 1] : 0.f;
    }
    float mm = -FLT_MAX;
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (ls[i] > 0.f) mm = fmaxf(mm, ms[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      ms[i] = ls[i] > 0.f ? exp2f(ms[i] - mm) : 0.f;  // the split's weight before 1 / l
      l += ls[i] * ms[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (lane + 32 * i < splits) wt[lane + 32 * i] = ms[i] / l;
  }
  __syncthreads();
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j) {
    const int sp = pi + j * P;
    if (sp < splits) acc = fmaf(ov[j], wt[sp], acc);
  }
  for (int sp = pi + kCombineBatch * P; sp < splits; sp += P)  // more splits than a batch
    acc = fmaf(base[sp * (D + 2) + 2 + d], wt[sp], acc);
  part[pi][d] = acc;
  __syncthreads();
  if (pi == 0) {
    float total = 0.f;
#pragma unroll
    for (int q = 0; q < P; ++q) total += part[q][d];
    out[static_cast<size_t>(h) * D + d] = from_f<T>(total);
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

// VPTQ_ATTN_PRELOAD=0: the first keys are loaded after the wait (for comparisons).
bool attn_preload() {
  static const bool on = [] {
    const char* v = std::getenv("VPTQ_ATTN_PRELOAD");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

template <typename T, int D, int G>
cudaError_t attn_typed(const AttnArgs& a, cudaStream_t stream) {
  const dim3 grid(a.Hkv, a.splits);
  cudaError_t err = launch_pdl(attn_split_kernel<T, D, G>, grid, dim3(kAttnWarps * 32), 0,
                               stream, static_cast<const T*>(a.q),
                               static_cast<const T*>(a.k_cache),
                               static_cast<const T*>(a.v_cache), a.pos, a.ws, a.S, a.window,
                               a.scale, attn_preload());
  if (err != cudaSuccess) return err;
  return launch_pdl(attn_combine_kernel<T, D>, dim3(a.Hkv * G), dim3(kCombineThreads), 0,
                    stream, static_cast<const float*>(a.ws), static_cast<T*>(a.out), a.splits);
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
    case 8: return attn_typed<T, D, 8>(a, stream);
    case 12: return attn_typed<T, D, 12>(a, stream);
    case 16: return attn_typed<T, D, 16>(a, stream);
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
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kNormCluster, rows);
    cfg.blockDim = dim3(((groups + steps - 1) / steps + 31) / 32 * 32);
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kNormCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = dependent_launch() ? 2 : 1;
    return cudaLaunchKernelEx(&cfg, add_rms_norm_parts_kernel<T>, xp, rt, wt, ot, st, H, eps);
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
  const dim3 grid(a.H + a.Hkv), block(threads);
  if (dtype == DType::kHalf)
    return launch_pdl(rope_kv_kernel<__half>, grid, block, 0, stream,
                      static_cast<const __half*>(a.q), static_cast<const __half*>(a.k),
                      static_cast<const __half*>(a.v), a.qp, a.kp, a.vp, a.cos, a.sin, a.pos,
                      static_cast<__half*>(a.q_out), static_cast<__half*>(a.k_cache),
                      static_cast<__half*>(a.v_cache), a.H, a.D, a.S);
  return launch_pdl(rope_kv_kernel<__nv_bfloat16>, grid, block, 0, stream,
                    static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.k),
                    static_cast<const __nv_bfloat16*>(a.v), a.qp, a.kp, a.vp, a.cos, a.sin,
                    a.pos, static_cast<__nv_bfloat16*>(a.q_out),
                    static_cast<__nv_bfloat16*>(a.k_cache),
                    static_cast<__nv_bfloat16*>(a.v_cache), a.H, a.D, a.S);
}

bool decode_attention_supported(int H, int Hkv, int D) {
  if (Hkv < 1 || H % Hkv != 0 || (D != 64 && D != 128)) return false;
  const int g = H / Hkv;
  return g <= 8 || g == 12 || g == 16;
}

int decode_attention_splits(int Hkv, int S, int num_sms) {
  // Two blocks per SM over the KV heads, but no split shorter than 32 keys of the whole cache.
  const int want = std::max(1, 2 * num_sms / std::max(1, Hkv));
  return std::max(1, std::min({want, (S + 31) / 32, kMaxSplits}));
}

cudaError_t launch_decode_attention(const AttnArgs& a, DType dtype, cudaStream_t stream) {
  if (!decode_attention_supported(a.H, a.Hkv, a.D) || a.splits < 1) return cudaErrorInvalidValue;
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
  const int threads = 256;
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

}  // namespace vptq
