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
// - silu_mul: silu(gate) * up.
// Every rounding matches the PyTorch code they replace (engine/model.py): fp32 inside, the
// activation dtype where PyTorch rounds.
#include <algorithm>
#include <cfloat>

#include "vptq.h"
#include "vptq_device.cuh"

namespace vptq {
namespace {

constexpr int kNormThreads = 512;

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

// One block per row. With r: s = round(x + r) (PyTorch's x + r), written to sum; then
// out = round(round(s * rsqrt(mean(s^2) + eps)) * w), as RMSNorm does in the activation dtype.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(
    const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ w, T* __restrict__ out,
    T* sum, int H, float eps) {
  __shared__ float red[kNormThreads / 32];
  const size_t row = static_cast<size_t>(blockIdx.x) * H;
  float ss = 0.f;
  for (int p = threadIdx.x; p < H; p += blockDim.x) {
    float s = to_f(x[row + p]);
    if (r) {
      const T rounded = from_f<T>(s + to_f(r[row + p]));
      sum[row + p] = rounded;
      s = to_f(rounded);
    }
    ss = fmaf(s, s, ss);
  }
  const float inv = rsqrtf(block_sum(ss, red) / H + eps);
  const T* src = r ? sum : x;  // this thread wrote the sums it reads back
  for (int p = threadIdx.x; p < H; p += blockDim.x) {
    const float n = to_f(from_f<T>(to_f(src[row + p]) * inv));
    out[row + p] = from_f<T>(n * to_f(w[p]));
  }
}

// Block b < H rotates query head b into q_out; block H + j rotates key head j and writes it and
// value head j into the caches at position *pos. Half-split RoPE: the first D/2 lanes pair with
// the second half, x * cos + rotate(x) * sin, each product rounded as PyTorch does.
template <typename T>
__global__ void rope_kv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ cos,
                               const float* __restrict__ sin, const int64_t* __restrict__ pos,
                               T* __restrict__ q_out, T* __restrict__ k_cache,
                               T* __restrict__ v_cache, int H, int D, int S) {
  const int head = blockIdx.x;
  const bool is_q = head < H;
  const int j = head - H;
  const T* src = is_q ? q + static_cast<size_t>(head) * D : k + static_cast<size_t>(j) * D;
  const int64_t p = *pos;
  const size_t slot = (static_cast<size_t>(j) * S + p) * D;  // cache [1, Hkv, S, D]
  const int half = D / 2;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const float xv = to_f(src[d]);
    const float other = to_f(src[d < half ? d + half : d - half]);
    const float rot = d < half ? -other : other;
    const float c = cos[p * D + d], s = sin[p * D + d];
    const T y = from_f<T>(__fadd_rn(__fmul_rn(xv, c), __fmul_rn(rot, s)));
    if (is_q) {
      q_out[static_cast<size_t>(head) * D + d] = y;
    } else {
      k_cache[slot + d] = y;
      v_cache[slot + d] = v[static_cast<size_t>(j) * D + d];
    }
  }
}

constexpr int kAttnWarps = 4;
constexpr int kMaxGqa = 16;  // query heads per KV head the attention kernel takes

// Split s of KV head h: keys [lo + s * len, ...) of the visible range [lo, pos], one warp per key
// in turn, lanes over the head dimension (E = D / 32 values each). Online softmax per query
// head in base 2; the warps' states are merged in shared memory and written to ws as
// (m, l, o[D]) per query head: the combine kernel merges the splits.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnWarps * 32) attn_split_kernel(
    const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    const int64_t* __restrict__ pos, float* __restrict__ ws, int S, int window, float scale) {
  constexpr int E = D / 32;
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int p = static_cast<int>(*pos);
  const int lo = window > 0 ? max(0, p - window + 1) : 0;
  const int n = p + 1 - lo;
  const int len = (n + splits - 1) / splits;
  const int k0 = lo + split * len, k1 = min(lo + n, k0 + len);

  float qv[G][E], o[G][E], m[G], l[G];
  const float qs = scale * 1.4426950408889634f;  // softmax in base 2
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qh = q + static_cast<size_t>(h * G + g) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[g][e] = to_f(qh[e]) * qs;
      o[g][e] = 0.f;
    }
    m[g] = -FLT_MAX;
    l[g] = 0.f;
  }
  const T* kh = kc + static_cast<size_t>(h) * S * D + lane * E;
  const T* vh = vc + static_cast<size_t>(h) * S * D + lane * E;
  for (int key = k0 + warp; key < k1; key += kAttnWarps) {
    float kv[E], vv[E];
    load_code<T, E>(kh + static_cast<size_t>(key) * D, kv);
    load_code<T, E>(vh + static_cast<size_t>(key) * D, vv);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s = fmaf(qv[g][e], kv[e], s);
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
      const float mn = fmaxf(m[g], s);
      const float corr = exp2f(m[g] - mn), pr = exp2f(s - mn);
      l[g] = l[g] * corr + pr;
#pragma unroll
      for (int e = 0; e < E; ++e) o[g][e] = fmaf(o[g][e], corr, pr * vv[e]);
      m[g] = mn;
    }
  }
  // Merge the warps: warp 0 takes the others' states from shared memory.
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
    for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, sm[w][g][0]);
    float acc = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) {
      const float f = sm[w][g][1] > 0.f ? exp2f(sm[w][g][0] - mm) : 0.f;
      acc += f * (c == 0 ? 0.f : c == 1 ? sm[w][g][1] : so[w][g][c - 2]);
    }
    // ws: [H, splits, D + 2] = (m, l, o)
    ws[(static_cast<size_t>(h * G + g) * splits + split) * (D + 2) + c] = c == 0 ? mm : acc;
  }
}

// Query head h: the splits' states merged, o / l written in the activation dtype.
template <typename T>
__global__ void attn_combine_kernel(const float* __restrict__ ws, T* __restrict__ out,
                                    int splits, int D) {
  const int h = blockIdx.x;
  const float* base = ws + static_cast<size_t>(h) * splits * (D + 2);
  float mm = -FLT_MAX;
  for (int s = 0; s < splits; ++s)
    if (base[s * (D + 2) + 1] > 0.f) mm = fmaxf(mm, base[s * (D + 2)]);
  float l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ls = base[s * (D + 2) + 1];
    if (ls > 0.f) l += ls * exp2f(base[s * (D + 2)] - mm);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ls = base[s * (D + 2) + 1];
      if (ls > 0.f) acc += base[s * (D + 2) + 2 + d] * exp2f(base[s * (D + 2)] - mm);
    }
    out[static_cast<size_t>(h) * D + d] = from_f<T>(acc / l);
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = to_f(g[i]);
    const float s = to_f(from_f<T>(a / (1.f + expf(-a))));  // F.silu rounds to the dtype
    out[i] = from_f<T>(s * to_f(u[i]));
  }
}

template <typename T, int D, int G>
cudaError_t attn_typed(const AttnArgs& a, cudaStream_t stream) {
  const dim3 grid(a.Hkv, a.splits);
  attn_split_kernel<T, D, G><<<grid, kAttnWarps * 32, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.pos, a.ws, a.S, a.window, a.scale);
  attn_combine_kernel<T><<<a.Hkv * G, D, 0, stream>>>(a.ws, static_cast<T*>(a.out), a.splits, D);
  return cudaGetLastError();
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

}  // namespace

cudaError_t launch_rms_norm(const void* x, const void* r, const void* w, void* out, void* sum,
                            int rows, int H, float eps, DType dtype, cudaStream_t stream) {
  const int threads = std::min(kNormThreads, ((H + 31) / 32) * 32);
  if (dtype == DType::kHalf)
    rms_norm_kernel<__half><<<rows, threads, 0, stream>>>(
        static_cast<const __half*>(x), static_cast<const __half*>(r),
        static_cast<const __half*>(w), static_cast<__half*>(out), static_cast<__half*>(sum), H,
        eps);
  else
    rms_norm_kernel<__nv_bfloat16><<<rows, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(r),
        static_cast<const __nv_bfloat16*>(w), static_cast<__nv_bfloat16*>(out),
        static_cast<__nv_bfloat16*>(sum), H, eps);
  return cudaGetLastError();
}

cudaError_t launch_rope_kv(const RopeArgs& a, DType dtype, cudaStream_t stream) {
  const int threads = std::min(256, a.D);
  if (dtype == DType::kHalf)
    rope_kv_kernel<__half><<<a.H + a.Hkv, threads, 0, stream>>>(
        static_cast<const __half*>(a.q), static_cast<const __half*>(a.k),
        static_cast<const __half*>(a.v), a.cos, a.sin, a.pos, static_cast<__half*>(a.q_out),
        static_cast<__half*>(a.k_cache), static_cast<__half*>(a.v_cache), a.H, a.D, a.S);
  else
    rope_kv_kernel<__nv_bfloat16><<<a.H + a.Hkv, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.k),
        static_cast<const __nv_bfloat16*>(a.v), a.cos, a.sin, a.pos,
        static_cast<__nv_bfloat16*>(a.q_out), static_cast<__nv_bfloat16*>(a.k_cache),
        static_cast<__nv_bfloat16*>(a.v_cache), a.H, a.D, a.S);
  return cudaGetLastError();
}

bool decode_attention_supported(int H, int Hkv, int D) {
  if (Hkv < 1 || H % Hkv != 0 || (D != 64 && D != 128)) return false;
  const int g = H / Hkv;
  return g <= 8 || g == 12 || g == 16;
}

int decode_attention_splits(int Hkv, int S, int num_sms) {
  // Two blocks per SM over the KV heads, but no split shorter than 32 keys of the whole cache.
  const int want = std::max(1, 2 * num_sms / std::max(1, Hkv));
  return std::max(1, std::min(want, (S + 31) / 32));
}

cudaError_t launch_decode_attention(const AttnArgs& a, DType dtype, cudaStream_t stream) {
  if (!decode_attention_supported(a.H, a.Hkv, a.D) || a.splits < 1) return cudaErrorInvalidValue;
  if (dtype == DType::kHalf) return attn_by_dim<__half>(a, stream);
  return attn_by_dim<__nv_bfloat16>(a, stream);
}

cudaError_t launch_silu_mul(const void* g, const void* u, void* out, int64_t n, DType dtype,
                            cudaStream_t stream) {
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kHalf)
    silu_mul_kernel<__half><<<blocks, threads, 0, stream>>>(
        static_cast<const __half*>(g), static_cast<const __half*>(u), static_cast<__half*>(out),
        n);
  else
    silu_mul_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(g), static_cast<const __nv_bfloat16*>(u),
        static_cast<__nv_bfloat16*>(out), n);
  return cudaGetLastError();
}

}  // namespace vptq
