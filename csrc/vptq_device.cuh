// Device helpers shared by the kernel files: dtype conversion and codeword loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

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

// Tokens a kernel instance is compiled for: 1, 2, 4 or 8 (T tokens run in the next tile up).
inline int tokens_tile(int T) { return T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8; }

}  // namespace vptq
