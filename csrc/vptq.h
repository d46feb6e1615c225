// VPTQ lookup kernels: the launcher interface shared by vptq_kernels.cu and vptq_ops.cpp.
// Torch-free on purpose, so the .cu file compiles with bare nvcc (CI has no GPU build of torch).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace vptq {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// One quantized layer. Float tensors are in the activation dtype. Null pointers mean "absent".
// Stored column y (0 <= y < K) holds original column perm[y]; inv_perm is its inverse.
struct Layer {
  const int32_t* indices = nullptr;       // [G, R, W32] packed main|residual indices
  const void* centroids = nullptr;        // [G, k, v]
  const void* res_centroids = nullptr;    // [G, kr, v]
  const int16_t* outlier_indices = nullptr;  // [R0, P] (uint16 values)
  const void* outlier_centroids = nullptr;   // [k0, v0]
  const int32_t* perm = nullptr;          // [K] stored -> original column
  const int32_t* inv_perm = nullptr;      // [K] original -> stored column
  const void* scale = nullptr;            // [K] weight_scale (by original column)
  const void* wbias = nullptr;            // [K] weight_bias  (by original column)
  const void* bias = nullptr;             // [N]
  int N = 0, K = 0, v = 0, k = 0, kr = 0, G = 1, S = 0, P = 0, v0 = 0, k0 = 0;
  int b1 = 0, b2 = 0, words = 0;          // main bits, residual bits, int32 words per row
};

// W = dequant(layer): [N, K] row-major in `dtype`. Any v in 2..16, outliers included.
cudaError_t launch_dequant(const Layer& L, void* out, DType dtype, cudaStream_t stream);

// y = x W^T + bias for T tokens without materialising W. x: [T, K], out: [T, N].
// workspace: at least gemv_workspace_floats(...) floats (may be null when that is 0); splits
// from gemv_splits with the same num_sms (the device's SMs).
bool gemv_supported(const Layer& L, int T);
int gemv_splits(const Layer& L, int T, int num_sms);
size_t gemv_workspace_floats(const Layer& L, int T, int splits);
cudaError_t launch_gemv(const Layer& L, const void* x, int T, void* out, float* workspace,
                        int splits, int num_sms, DType dtype, cudaStream_t stream);

// A decode activation given as partial sums (engine/ops/decode.py Partial): value i is
// round(p[i] + p[stride + i] + ... + p[(n - 1) * stride + i]) in the activation dtype, the
// terms added in that order. The sliced GEMV leaves its output so (SlicedGroup::partial) for
// the kernel that reads it to add, instead of ending with one block per row block adding its
// slices while the rest of the GPU waits (csrc/KERNELS.md session 13). p == nullptr: the
// input is a whole tensor in the activation dtype.
struct Parts {
  const float* p = nullptr;
  int n = 0;
  int64_t stride = 0;
};

// The sliced GEMV (vptq_sliced.cu, engine/ops/sliced.py builds the layout): the lookups of a
// layer regrouped at load time by codebook slice, so every block serves its lookups from a
// slice held in shared memory. entries[i] = (column within chunk << 16) | codeword within slice,
// sorted by segment (slice, column chunk, vector-row); segment s spans offsets[s]..offsets[s+1].
struct SlicedLayer {
  const uint32_t* entries = nullptr;   // [E]
  const uint16_t* res_codes = nullptr; // [E] residual codeword of each entry (small residual)
  const int32_t* offsets = nullptr;    // [n_slices * n_chunks * rows + 1]
  const void* table = nullptr;         // [n_cw, v] codebooks, concatenated
  const void* res_table = nullptr;     // [res_cw * res_copies, v] small residual codebooks
  const void* scale = nullptr;         // [K] weight_scale (original columns)
  const void* wbias = nullptr;         // [K] weight_bias
  const void* bias = nullptr;          // [N]
  int32_t* counters = nullptr;         // [row_blocks], zero between calls (the kernel resets)
  int N = 0, K = 0, v = 0, n_cw = 0, slice_cw = 0, n_slices = 0, chunk_cols = 0, n_chunks = 0;
  int rows = 0, res_cw = 0, row_block = 0, row_blocks = 0;
  // Blocks a row block takes, and terms of its sums: one for each slice of each column chunk
  // (part = chunk * n_slices + slice).
  __host__ __device__ int parts() const { return n_slices * n_chunks; }
};

// Copies of a small residual codebook in a block's shared memory, one for each lane a
// shared-memory wavefront serves, where a codeword is one load (v = 2, 4, 8) and the copies fit
// in kResCopyBytes: lane i reads codeword r at (r * copies + i % copies) * v, so the lanes of a
// wavefront always read different banks. With one copy, the residual codewords of a
// quarter-warp's eight random codes took 2.5 wavefronts where one would do (8B v8-k65536-256,
// csrc/KERNELS.md session 31). engine/ops/sliced.py res_copies mirrors this.
constexpr int kResCopyBytes = 32768;
__host__ __device__ inline int res_copies(int v, int res_cw) {
  const int unit = v % 8 == 0 ? 16 : v % 4 == 0 ? 8 : 4;  // bytes a load of a codeword takes
  const int copies = 128 / unit;
  return res_cw > 0 && v * 2 == unit && res_cw * copies * v * 2 <= kResCopyBytes ? copies : 1;
}

constexpr int kSlicedThreads = 512;
// Entries the sliced GEMV may read past a segment's end (a batch, vptq_sliced.cuh): the
// entries (and residual codes) end with this many padding entries (engine/memory.py
// SLICED_READ_AHEAD).
constexpr int kSlicedReadAhead = 288;
// Shared memory the sliced GEMV's static arrays may take beside its dynamic plan
// (engine/ops/sliced.py STATIC_SMEM).
constexpr int kSlicedStaticSmem = 1024;
constexpr int kMaxGroup = 3;  // layers sharing x in one launch (q, k, v)
constexpr int kGroupTokens = 2;  // most tokens a launch of several layers takes (decode: 1)

// Layers that share their input, launched together: their blocks (row_blocks * parts() each,
// layer i first) fill one wave, so the fixed cost of a launch (slice copies, the last blocks'
// sums) is paid once for all of them. They share K, v and the residual kind.
struct SlicedGroup {
  SlicedLayer L[kMaxGroup];
  void* out[kMaxGroup] = {};   // [T, N_i]
  float* ws[kMaxGroup] = {};   // [parts_i * T * N_i] partial sums
  int n = 0;
  // The output left as Parts of parts_i + 1 terms: ws[i] is then [parts_i + 1, T, N_i], term 0
  // the bias (zero without one) and term 1 + part that part's sums, slice 0's parts with
  // dot(x, weight_bias) over their chunk's columns added; out[i] is not written.
  bool partial = false;
};

// Dynamic shared memory the sliced GEMV needs for a tile of nt tokens (1, 2, 4 or 8).
size_t sliced_smem_bytes(const SlicedLayer& L, int nt);
// Whether the sliced GEMV takes T tokens of this layer (tile, shared memory, index range).
bool sliced_supported(const SlicedLayer& L, int T, size_t smem_optin);
cudaError_t launch_sliced_gemv(const SlicedGroup& G, const void* x, int T, DType dtype,
                               cudaStream_t stream);

// The rest of a batch-1 decode step, fused (vptq_decode.cu). Tensors are contiguous, in the
// activation dtype unless said otherwise.
// out = w * norm(x) per row of H; with r: sum = x + r first, and the norm is of sum. Inputs
// with a Parts beside them may come as partial sums (then their pointer is ignored).
cudaError_t launch_rms_norm(const void* x, Parts xp, const void* r, const void* w, void* out,
                            void* sum, int rows, int H, float eps, DType dtype,
                            cudaStream_t stream);

struct RopeArgs {
  const void* q = nullptr;      // [T, H, D] the tokens' query heads
  const void* k = nullptr;      // [T, Hkv, D]
  const void* v = nullptr;      // [T, Hkv, D]
  Parts qp, kp, vp;             // q, k, v as partial sums, where given (one token)
  const float* cos = nullptr;   // fp32 RoPE tables: row p - start for position p
  const float* sin = nullptr;
  const int64_t* pos = nullptr; // [1] one decode token's position, on the device; or null
  int64_t start = 0;            // token t sits at position *pos + start + t (null pos: 0)
  void* q_out = nullptr;        // [H, T, D] rotated query
  void* k_cache = nullptr;      // [Hkv, S, D]: rotated keys written at their positions
  void* v_cache = nullptr;      // [Hkv, S, D]: values written there
  int H = 0, Hkv = 0, D = 0, S = 0, T = 1;
};
cudaError_t launch_rope_kv(const RopeArgs& a, DType dtype, cudaStream_t stream);

struct AttnArgs {
  const void* q = nullptr;        // [H, D]
  const void* k_cache = nullptr;  // [Hkv, S, D]
  const void* v_cache = nullptr;  // [Hkv, S, D]
  const int64_t* pos = nullptr;   // [1] keys max(0, pos - window + 1) .. pos are visible
  void* out = nullptr;            // [H, D]
  float* ws = nullptr;            // fp32: o [H, splits, D], then (m, l) [H, splits, 2]
  int H = 0, Hkv = 0, D = 0, S = 0, splits = 1, window = 0;  // window 0: none
  float scale = 1.f;
  bool tensor_cores = false;  // the MMA kernel (compute capability 8.0 and later)
};
bool decode_attention_supported(int H, int Hkv, int D);
bool decode_attention_tensor_cores_supported();  // on the current device
// grid.y of a launch
int decode_attention_splits(int H, int Hkv, int S, int num_sms, bool tensor_cores);
cudaError_t launch_decode_attention(const AttnArgs& a, DType dtype, cudaStream_t stream);

// out[i] = table[ids[i]] for n ids, rows of `hidden` values; the table may lie in pinned host
// memory (read over the bus through its device address). Ids outside 0..vocab-1 give zeros.
cudaError_t launch_embed_rows(const void* table, const int64_t* ids, void* out, int64_t n,
                              int64_t vocab, int64_t hidden, cudaStream_t stream);

// The greedy pick that ends a decode step: *token = argmax(logits[0 .. V)) (the first of equal
// maxima, NaN as the largest), seen[*token] = true, *pos += 1. ws: greedy_pick_blocks(V) floats
// (wv) and int64s (wi); ticket: one int32 zero, left zero.
int greedy_pick_blocks(int64_t V);
cudaError_t launch_greedy_pick(const void* logits, int64_t V, float* wv, int64_t* wi, int* ticket,
                               int64_t* token, bool* seen, int64_t* pos, DType dtype,
                               cudaStream_t stream);

// The sampled pick that ends a decode step (temperature >= 0, 0 < top_p <= 1, 0 <= min_p < 1,
// top_k >= 0, penalty > 0): *token = the kept token with the largest p / noise[token] (noise: V
// float32 draws of Exp(1); not read at temperature 0, the greedy pick), seen[*token] = true,
// *pos += 1 (vptq_decode.cu sample_pick_kernel). Compute capability 9.0
// (cudaErrorNotSupported before) and sample_pick_supported(V). params, where not null: five
// doubles on the GPU (temperature, top_p, min_p, top_k, penalty) read in place of the five
// values, so that a captured graph takes new settings.
bool sample_pick_supported(int64_t V);
cudaError_t launch_sample_pick(const void* logits, const float* noise, int64_t V,
                               float temperature, double top_p, float min_p, int64_t top_k,
                               float penalty, const double* params, int64_t* token, bool* seen,
                               int64_t* pos, DType dtype, cudaStream_t stream);

// A GPTQ layer at a few tokens (vptq_gptq.cu): out[t, n] = sum_k x[t, k] * scales[g, n] *
// (q[k, n] - zeros[g, n]) + bias[n], g = g_idx[k]; q packed in qweight [K * bits / 32, N]
// (engine/formats/gptq.py), zeros the true zero points [groups, N], x [tokens, K] and out
// [tokens, N] contiguous; bias may be null. K % 32 == 0; bits 2, 3, 4 or 8. part: fp32
// workspace of gptq_splits(N, K, num_sms) * tokens * N values. perm (may be null): qweight's
// rows sorted by group, row k holding input perm[k]. group_size > 0 promises g_idx[k] = k /
// group_size (it picks the faster kernel where that is a multiple of 32); 0 promises nothing.
struct GptqArgs {
  const void* x;
  const int32_t* qweight;
  const int32_t* zeros;
  const void* scales;
  const int32_t* g_idx;
  const int32_t* perm;
  int group_size;
  const void* bias;
  void* out;
  float* part;
  int64_t N, K, tokens;
  int bits;
  DType dtype;
};
int gptq_splits(int64_t N, int64_t K, int num_sms);
cudaError_t launch_gptq_gemv(const GptqArgs& a, int num_sms, cudaStream_t stream);

// Columns n0 .. n0 + cols of a GPTQ layer's dense weight (vptq_gptq.cu): out [K, cols]
// row-major, out[k, c] = scales[g, n0 + c] * (q[k, n0 + c] - zeros[g, n0 + c]), g = g_idx[k],
// in the scales' dtype. K % 32 == 0, K / 32 <= 65535. perm (may be null): as GptqArgs; row k
// is written to out row perm[k], so out is W in the checkpoint's row order.
struct GptqDequantArgs {
  const int32_t* qweight;
  const int32_t* zeros;
  const void* scales;
  const int32_t* g_idx;
  const int32_t* perm;
  void* out;
  int64_t N, K, n0, cols;
  int bits;
  DType dtype;
};
cudaError_t launch_gptq_dequant(const GptqDequantArgs& a, cudaStream_t stream);

// out = silu(g) * u elementwise, n values.
cudaError_t launch_silu_mul(const void* g, Parts gp, const void* u, Parts up, void* out,
                            int64_t n, DType dtype, cudaStream_t stream);

}  // namespace vptq
