// Device helpers shared by the kernel files: dtype conversion, codeword loads, and programmatic
// dependent launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "vptq.h"

namespace vptq {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Values idx[k] of K decode activations, each given whole (y[k]) or as Parts (vptq.h: the
// terms added in order, rounded to T as the whole tensor would hold it). The loads of all their
// terms are in flight together, 16 terms at a time: a kernel reading two or three such values
// a thread waits one round trip of L2 latency for them, not one each.
template <typename T, int K>
__device__ __forceinline__ void acts(const T* const* y, const Parts* yp, const size_t* idx,
                                     float* out) {
  int n = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    out[k] = yp[k].p ? __ldcg(yp[k].p + idx[k]) : to_f(y[k][idx[k]]);
    n = max(n, yp[k].n);  // 0 for a whole tensor
  }
  for (int q = 1; q < n; q += 16) {
    float v[K][16];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (yp[k].n == 0) continue;  // a whole tensor
#pragma unroll
      for (int u = 0; u < 16; ++u)  // past the last term: that one again, not added (no branch)
        v[k][u] = __ldcg(yp[k].p + min(q + u, yp[k].n - 1) * yp[k].stride + idx[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int u = 0; u < 16; ++u)
        if (q + u < yp[k].n) out[k] += v[k][u];
  }
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (yp[k].p) out[k] = to_f(from_f<T>(out[k]));
}

// Value i of an input given whole (y) or as partial sums (yp.p set).
template <typename T>
__device__ __forceinline__ float act(const T* y, const Parts& yp, size_t i) {
  float out;
  acts<T, 1>(&y, &yp, &i, &out);
  return out;
}

// A v-wide codeword as floats, with the widest loads its alignment allows
// (the codeword starts at a multiple of v*2 bytes).
template <typename T, int V>
__device__ __forceinline__ void load_code(const T* p, float (&out)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + 8 * c);
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[8 * c + i] = to_f(h[i]);
    }
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int c = 0; c < V / 4; ++c) {
      const uint2 u = *reinterpret_cast<const uint2*>(p + 4 * c);
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[4 * c + i] = to_f(h[i]);
    }
  } else {
    static_assert(V % 2 == 0, "odd vector lengths take the dequant path");
#pragma unroll
    for (int c = 0; c < V / 2; ++c) {
      const uint32_t u = *reinterpret_cast<const uint32_t*>(p + 2 * c);
      const T* h = reinterpret_cast<const T*>(&u);
      out[2 * c] = to_f(h[0]);
      out[2 * c + 1] = to_f(h[1]);
    }
  }
}

// Programmatic dependent launch (PDL, compute capability 9.0 and later; VPTQ_PDL=0 turns it
// off). A decode step is a chain of short kernels, and each one's launch and block start-up
// would otherwise wait for the previous kernel to drain. A kernel launched by launch_pdl calls
// pdl_trigger() first, which lets the next kernel in the stream be scheduled at once, and
// pdl_wait() before it touches anything an earlier kernel writes: that returns once the
// previous kernel has finished and its writes are visible, and since every kernel of the chain
// waits so, once all earlier ones have. The next kernel is only scheduled when every block of
// this one has started, so a chain cannot deadlock on blocks waiting for resources.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}

// The generation VPTQ_CUDA_ARCH names ("86" or "8.6": 8), or 0 where unset: the kernels were then
// compiled for that older generation (engine/ops/arch.py), and the host launches them as on it.
inline int emulated_major() {
  const char* e = std::getenv("VPTQ_CUDA_ARCH");
  const int v = e ? std::atoi(e) : 0;
  return v >= 10 ? v / 10 : v;
}

// The current device's compute capability major (0 where it cannot be asked), or VPTQ_CUDA_ARCH's
// where that is older, asked once per device.
inline int compute_major() {
  static std::atomic<int> known[64] = {};  // 0: not asked yet, else major + 1
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (known[dev].load() == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      major = 0;
    const int as = emulated_major();
    if (as > 0 && as < major) major = as;
    known[dev].store(major + 1);
  }
  return known[dev].load() - 1;
}

// Whether the current device has compute capability 9.0 or later (PDL, thread block clusters).
inline bool hopper_or_later() { return compute_major() >= 9; }

// Whether the environment variable `name` is `value`: the switches for comparisons (VPTQ_PDL=0
// and the like, README), each read once by its caller into a static.
inline bool switched_to(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}
inline bool switched_off(const char* name) { return switched_to(name, "0"); }
inline bool switched_on(const char* name) { return switched_to(name, "1"); }

// Whether kernels on the current device are launched with PDL.
inline bool dependent_launch() {
  static const bool off = switched_off("VPTQ_PDL");
  return !off && hopper_or_later();
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL where dependent_launch() allows;
// cluster > 0: in thread block clusters of that many blocks along x (compute capability 9.0).
template <typename... Params, typename... Args>
cudaError_t launch_pdl_in(int cluster, void (*kernel)(Params...), dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cluster > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (dependent_launch()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  return launch_pdl_in(0, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// Tokens a kernel instance is compiled for: 1, 2, 4 or 8 (T tokens run in the next tile up).
inline int tokens_tile(int T) { return T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8; }

}  // namespace vptq
