// The torch ops of the VPTQ kernels: the one TORCH_LIBRARY registration of this project.
// meta = [N, K, v, k, kr, G, S, P, v0, k0, b1, b2] (engine/ops/cuda.py builds it from a spec).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdio>
#include <optional>
#include <tuple>
#include <string>
#include <type_traits>
#include <vector>

#include "vptq.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

// Error messages are joined from std::string pieces, never with iostreams: c10::str's
// ostringstream, instantiated in this library, crashed (SIGSEGV in std::ostream::_M_insert<long>)
// on a machine whose loaded libstdc++ differs from the compiler's headers (the H200 test
// machine). TORCH_CHECK passes a single std::string through untouched.
template <typename T>
std::string piece(const T& a) {
  if constexpr (std::is_integral_v<T>) {
    return std::to_string(a);
  } else if constexpr (std::is_floating_point_v<T>) {
    char s[32];  // 0.7, not 0.700000
    std::snprintf(s, sizeof(s), "%g", static_cast<double>(a));
    return s;
  } else if constexpr (std::is_same_v<T, at::ScalarType>) {
    return c10::toString(a);
  } else if constexpr (std::is_same_v<T, at::IntArrayRef>) {
    std::string s = "[";
    for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
    return s + "]";
  } else {
    return std::string(a);
  }
}

template <typename... A>
std::string msg(const A&... a) {
  return (std::string() + ... + piece(a));
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

vptq::DType dtype_of(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16,
              msg("vptq kernels take float16 or bfloat16, got ", t));
  return t == at::kHalf ? vptq::DType::kHalf : vptq::DType::kBFloat16;
}

vptq::DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

void check_float(const OptTensor& t, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->is_contiguous(),
              msg(name, " must be a contiguous CUDA tensor"));
  TORCH_CHECK(t->scalar_type() == like.scalar_type(),
              msg(name, " is ", t->scalar_type(), " but the activations are ",
                  like.scalar_type()));
}

void check_int(const OptTensor& t, at::ScalarType type, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == type,
              msg(name, " must be a contiguous CUDA ", type, " tensor"));
}

vptq::Layer make_layer(const at::Tensor& indices, const at::Tensor& centroids,
                       const OptTensor& res_centroids, const OptTensor& outlier_indices,
                       const OptTensor& outlier_centroids, const OptTensor& perm,
                       const OptTensor& inv_perm, const OptTensor& scale, const OptTensor& wbias,
                       const OptTensor& bias, at::IntArrayRef meta) {
  TORCH_CHECK(meta.size() == 12, "meta must hold 12 ints");
  check_int(indices, at::kInt, "indices");
  check_float(centroids, centroids, "centroids");
  check_float(res_centroids, centroids, "res_centroids");
  check_float(outlier_centroids, centroids, "outlier_centroids");
  check_float(scale, centroids, "weight_scale");
  check_float(wbias, centroids, "weight_bias");
  check_float(bias, centroids, "bias");
  check_int(outlier_indices, at::kShort, "outlier_indices");
  check_int(perm, at::kInt, "perm");
  check_int(inv_perm, at::kInt, "inv_perm");
  vptq::Layer L;
  L.indices = indices.data_ptr<int32_t>();
  L.centroids = centroids.data_ptr();
  L.res_centroids = ptr(res_centroids);
  L.outlier_indices = outlier_indices.has_value() ? outlier_indices->data_ptr<int16_t>() : nullptr;
  L.outlier_centroids = ptr(outlier_centroids);
  L.perm = perm.has_value() ? perm->data_ptr<int32_t>() : nullptr;
  L.inv_perm = inv_perm.has_value() ? inv_perm->data_ptr<int32_t>() : nullptr;
  L.scale = ptr(scale);
  L.wbias = ptr(wbias);
  L.bias = ptr(bias);
  L.N = meta[0]; L.K = meta[1]; L.v = meta[2]; L.k = meta[3]; L.kr = meta[4]; L.G = meta[5];
  L.S = meta[6]; L.P = meta[7]; L.v0 = meta[8]; L.k0 = meta[9]; L.b1 = meta[10]; L.b2 = meta[11];
  L.words = static_cast<int>(indices.size(-1));
  const int64_t rows = (L.N + L.v - 1) / L.v;
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == L.G && indices.size(1) == rows,
              msg("indices shape ", indices.sizes(), " does not match G=", L.G, " rows=", rows));
  TORCH_CHECK(static_cast<int64_t>(L.words) * 32 >= static_cast<int64_t>(L.S) * (L.b1 + L.b2),
              "indices hold too few words per row");
  TORCH_CHECK(centroids.numel() == static_cast<int64_t>(L.G) * L.k * L.v, "centroids size");
  TORCH_CHECK(L.P == 0 || (outlier_indices.has_value() && outlier_centroids.has_value()),
              "outliers need outlier_indices and outlier_centroids");
  return L;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess,
              msg("vptq ", what, " launch failed: ", cudaGetErrorString(err)));
}

at::Tensor dequant_cuda(const at::Tensor& indices, const at::Tensor& centroids,
                        const OptTensor& res_centroids, const OptTensor& outlier_indices,
                        const OptTensor& outlier_centroids, const OptTensor& perm,
                        const OptTensor& inv_perm, const OptTensor& weight_scale,
                        const OptTensor& weight_bias, at::IntArrayRef meta) {
  const c10::cuda::CUDAGuard guard(indices.device());
  const vptq::Layer L = make_layer(indices, centroids, res_centroids, outlier_indices,
                                   outlier_centroids, perm, inv_perm, weight_scale, weight_bias,
                                   std::nullopt, meta);
  at::Tensor out = at::empty({L.N, L.K}, centroids.options());
  check_launch(vptq::launch_dequant(L, out.data_ptr(), dtype_of(centroids),
                                    at::cuda::getCurrentCUDAStream()),
               "dequant");
  return out;
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& centroids,
                     const OptTensor& res_centroids, const OptTensor& perm,
                     const OptTensor& weight_scale, const OptTensor& weight_bias,
                     const OptTensor& bias, at::IntArrayRef meta) {
  const c10::cuda::CUDAGuard guard(x.device());
  const vptq::Layer L = make_layer(indices, centroids, res_centroids, std::nullopt, std::nullopt,
                                   perm, std::nullopt, weight_scale, weight_bias, bias, meta);
  TORCH_CHECK(x.size(-1) == L.K, msg("x has ", x.size(-1), " features, the layer takes ", L.K));
  check_float(x.contiguous(), centroids, "x");
  const at::Tensor xc = x.contiguous();
  const int tokens = static_cast<int>(xc.numel() / L.K);
  TORCH_CHECK(vptq::gemv_supported(L, tokens),
              msg("the fused GEMV does not take this layer with ", tokens,
                  " tokens; use dequant + GEMM"));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = L.N;
  at::Tensor out = at::empty(shape, x.options());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = vptq::gemv_splits(L, tokens, sms);
  const size_t ws_floats = vptq::gemv_workspace_floats(L, tokens, splits);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, x.options().dtype(at::kFloat));
  check_launch(vptq::launch_gemv(L, xc.data_ptr(), tokens, out.data_ptr(),
                                 ws_floats ? ws.data_ptr<float>() : nullptr, splits, sms,
                                 dtype_of(x), at::cuda::getCurrentCUDAStream()),
               "gemv");
  return out;
}

// One layer of a sliced launch. meta = [N, K, v, n_cw, slice_cw, n_slices, chunk_cols,
// n_chunks, rows, res_cw, row_block, row_blocks] (engine/ops/sliced.py); counters comes back as
// it went in (all zero).
vptq::SlicedLayer sliced_layer(const at::Tensor& x, const at::Tensor& entries,
                               const OptTensor& res_codes, const at::Tensor& offsets,
                               const at::Tensor& table, const OptTensor& res_table,
                               const OptTensor& weight_scale, const OptTensor& weight_bias,
                               const OptTensor& bias, const at::Tensor& counters,
                               at::IntArrayRef meta) {
  TORCH_CHECK(meta.size() == 12, "meta must hold 12 ints per layer");
  check_int(entries, at::kInt, "entries");
  check_int(res_codes, at::kShort, "res_codes");
  check_int(offsets, at::kInt, "offsets");
  check_int(counters, at::kInt, "counters");
  check_float(table, x, "table");
  check_float(res_table, x, "res_table");
  check_float(weight_scale, x, "weight_scale");
  check_float(weight_bias, x, "weight_bias");
  check_float(bias, x, "bias");
  vptq::SlicedLayer L;
  L.N = meta[0]; L.K = meta[1]; L.v = meta[2]; L.n_cw = meta[3]; L.slice_cw = meta[4];
  L.n_slices = meta[5]; L.chunk_cols = meta[6]; L.n_chunks = meta[7]; L.rows = meta[8];
  L.res_cw = meta[9]; L.row_block = meta[10]; L.row_blocks = meta[11];
  TORCH_CHECK(x.size(-1) == L.K, msg("x has ", x.size(-1), " features, the layer takes ", L.K));
  TORCH_CHECK(L.chunk_cols >= 1 && L.chunk_cols < 65536 &&
                  L.n_chunks == (L.K + L.chunk_cols - 1) / L.chunk_cols,
              msg("meta: ", L.n_chunks, " chunks of ", L.chunk_cols, " columns do not split K = ",
                  L.K, " (a column within a chunk is 16 bits)"));
  TORCH_CHECK(offsets.numel() == static_cast<int64_t>(L.n_slices) * L.n_chunks * L.rows + 1,
              "offsets size");
  TORCH_CHECK(table.numel() == static_cast<int64_t>(L.n_cw) * L.v, "table size");
  TORCH_CHECK(counters.numel() >= L.row_blocks, "counters size");
  TORCH_CHECK((L.res_cw > 0) == (res_codes.has_value() && res_table.has_value()),
              "res_codes and res_table go together with res_cw > 0");
  TORCH_CHECK(!res_codes.has_value() || res_codes->numel() == entries.numel(), "res_codes size");
  TORCH_CHECK(!res_table.has_value() ||
                  res_table->numel() ==
                      static_cast<int64_t>(L.res_cw) * vptq::res_copies(L.v, L.res_cw) * L.v,
              "res_table size: res_cw codewords, each res_copies times (vptq.h)");
  L.entries = reinterpret_cast<const uint32_t*>(entries.data_ptr<int32_t>());
  L.res_codes = res_codes.has_value()
                    ? reinterpret_cast<const uint16_t*>(res_codes->data_ptr<int16_t>())
                    : nullptr;
  L.offsets = offsets.data_ptr<int32_t>();
  L.table = table.data_ptr();
  L.res_table = ptr(res_table);
  L.scale = ptr(weight_scale);
  L.wbias = ptr(weight_bias);
  L.bias = ptr(bias);
  L.counters = counters.data_ptr<int32_t>();
  return L;
}

// y_i = x W_i^T + bias_i for 1..kMaxGroup layers sharing x, in one launch (argument i of each
// list belongs to layer i; they share v and whether a small residual rides along).
std::vector<at::Tensor> gemv_sliced_cuda(
    const at::Tensor& x, at::TensorList entries, const c10::List<OptTensor>& res_codes,
    at::TensorList offsets, at::TensorList table, const c10::List<OptTensor>& res_table,
    const c10::List<OptTensor>& weight_scale, const c10::List<OptTensor>& weight_bias,
    const c10::List<OptTensor>& bias, at::TensorList counters, at::IntArrayRef meta,
    bool partial) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int n = static_cast<int>(entries.size());
  TORCH_CHECK(n >= 1 && n <= vptq::kMaxGroup,
              msg("the sliced GEMV takes 1 to ", vptq::kMaxGroup, " layers, not ", n));
  for (size_t size : {res_codes.size(), offsets.size(), table.size(), res_table.size(),
                      weight_scale.size(), weight_bias.size(), bias.size(), counters.size()})
    TORCH_CHECK(static_cast<int>(size) == n, "every argument list needs one item per layer");
  TORCH_CHECK(static_cast<int>(meta.size()) == 12 * n, "meta must hold 12 ints per layer");
  const at::Tensor xc = x.contiguous();
  vptq::SlicedGroup G;
  G.n = n;
  for (int i = 0; i < n; ++i) {
    G.L[i] = sliced_layer(x, entries[i], res_codes.get(i), offsets[i], table[i], res_table.get(i),
                          weight_scale.get(i), weight_bias.get(i), bias.get(i), counters[i],
                          meta.slice(12 * i, 12));
    TORCH_CHECK(G.L[i].K == G.L[0].K && G.L[i].v == G.L[0].v &&
                    (G.L[i].res_cw > 0) == (G.L[0].res_cw > 0),
                "layers of one sliced launch share K, v and the residual kind");
  }
  const int tokens = static_cast<int>(xc.numel() / G.L[0].K);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  std::vector<at::Tensor> outs;
  int64_t ws_floats = 0;
  TORCH_CHECK(n == 1 || tokens <= vptq::kGroupTokens,
              msg("a sliced launch of several layers takes ", vptq::kGroupTokens,
                  " tokens at most, not ", tokens));
  for (int i = 0; i < n; ++i) {
    TORCH_CHECK(vptq::sliced_supported(G.L[i], tokens, optin),
                msg("the sliced GEMV does not take ", tokens,
                    " tokens for this layer; use dequant + GEMM"));
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = G.L[i].N;
    if (partial) {  // the output is its terms, vptq.h SlicedGroup::partial
      shape.insert(shape.begin(), G.L[i].parts() + 1);
      outs.push_back(at::empty(shape, x.options().dtype(at::kFloat)));
      G.ws[i] = outs.back().data_ptr<float>();
    } else {
      outs.push_back(at::empty(shape, x.options()));
      G.out[i] = outs.back().data_ptr();
      ws_floats += static_cast<int64_t>(G.L[i].parts()) * tokens * G.L[i].N;
    }
  }
  G.partial = partial;
  if (!partial) {
    at::Tensor ws = at::empty({ws_floats}, x.options().dtype(at::kFloat));
    float* w = ws.data_ptr<float>();
    for (int i = 0; i < n; ++i) {
      G.ws[i] = w;
      w += static_cast<int64_t>(G.L[i].parts()) * tokens * G.L[i].N;
    }
  }
  check_launch(vptq::launch_sliced_gemv(G, xc.data_ptr(), tokens, dtype_of(x),
                                        at::cuda::getCurrentCUDAStream()),
               "gemv_sliced");
  return outs;
}

// The decode-step ops (vptq_decode.cu).
void check_act(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), msg(name, " must be a contiguous CUDA tensor"));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(),
              msg(name, " is ", t.scalar_type(), " but the activations are ",
                  like.scalar_type()));
}

// A decode activation given whole (the activation dtype `dtype`) or, in float32 with one
// leading dimension more, as the terms of partial sums (vptq.h Parts, engine/ops/decode.py
// Partial). `sizes` is the whole tensor's shape.
struct Act {
  const void* whole = nullptr;
  vptq::Parts parts;
  std::vector<int64_t> sizes;
  int64_t numel = 0;
};

Act act_input(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), msg(name, " must be a contiguous CUDA tensor"));
  Act a;
  if (t.scalar_type() == at::kFloat && t.dim() >= 2 && t.size(0) >= 1) {
    a.parts.p = t.data_ptr<float>();
    a.parts.n = static_cast<int>(t.size(0));
    a.parts.stride = t.numel() / t.size(0);
    a.sizes.assign(t.sizes().begin() + 1, t.sizes().end());
    a.numel = a.parts.stride;
  } else {
    TORCH_CHECK(t.scalar_type() == dtype,
                msg(name, " is ", t.scalar_type(), " but the activations are ", dtype,
                    " (or float32 partial sums with a leading dimension of terms)"));
    a.whole = t.data_ptr();
    a.sizes.assign(t.sizes().begin(), t.sizes().end());
    a.numel = t.numel();
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x, const OptTensor& residual,
                                             const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  // x may come as partial sums where a residual gives the activation dtype
  TORCH_CHECK(x.scalar_type() != at::kFloat || residual.has_value(),
              "rms_norm takes x as partial sums only with a residual (add_rms_norm)");
  const at::Tensor& like = residual.has_value() ? *residual : x;
  const vptq::DType dt = dtype_of(like);
  const Act xa = act_input(x, like.scalar_type(), "x");
  check_act(weight, like, "weight");
  const int64_t H = xa.sizes.back();
  TORCH_CHECK(weight.numel() == H, msg("weight has ", weight.numel(), " values, x has ", H));
  at::Tensor out = at::empty(xa.sizes, like.options());
  at::Tensor sum;
  if (residual.has_value()) {
    check_act(*residual, like, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(xa.sizes),
                msg("residual ", residual->sizes(), " and x ", at::IntArrayRef(xa.sizes),
                    " differ"));
    sum = at::empty_like(*residual);
  }
  check_launch(vptq::launch_rms_norm(xa.whole, xa.parts, ptr(residual), weight.data_ptr(),
                                     out.data_ptr(), sum.defined() ? sum.data_ptr() : nullptr,
                                     static_cast<int>(xa.numel / H), static_cast<int>(H),
                                     static_cast<float>(eps), dt,
                                     at::cuda::getCurrentCUDAStream()),
               "rms_norm");
  return {out, sum};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm_impl(x, std::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x,
                                                     const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  return norm_impl(x, residual, weight, eps);
}

void check_cache(const at::Tensor& c, const at::Tensor& like, const char* name) {
  check_act(c, like, name);
  TORCH_CHECK(c.dim() == 4 && c.size(0) == 1,
              msg(name, " must be [1, kv_heads, max_seq, head_dim], not ", c.sizes()));
}

// The KV caches (two [1, Hkv, S, D] tensors of one shape beside `like`) and pos (one int64
// there), checked; their shape goes to a.Hkv, a.S, a.D (RopeArgs, AttnArgs).
template <typename Args>
void check_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
              const at::Tensor& like, Args& a) {
  check_cache(k_cache, like, "k_cache");
  check_cache(v_cache, like, "v_cache");
  TORCH_CHECK(pos.device() == like.device() && pos.scalar_type() == at::kLong && pos.numel() == 1,
              "pos must be one int64 on the activations' GPU");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  a.Hkv = static_cast<int>(k_cache.size(1));
  a.S = static_cast<int>(k_cache.size(2));
  a.D = static_cast<int>(k_cache.size(3));
}

at::Tensor rope_kv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                        const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const c10::cuda::CUDAGuard guard(q.device());
  const vptq::DType dt = dtype_of(k_cache);  // q, k and v may come as partial sums
  const Act qa = act_input(q, k_cache.scalar_type(), "q");
  const Act ka = act_input(k, k_cache.scalar_type(), "k");
  const Act va = act_input(v, k_cache.scalar_type(), "v");
  vptq::RopeArgs a;
  check_kv(k_cache, v_cache, pos, k_cache, a);
  TORCH_CHECK(a.D % 2 == 0 && qa.numel % a.D == 0,
              msg("q holds ", qa.numel, " values, not whole heads of ", a.D));
  a.H = static_cast<int>(qa.numel / a.D);
  TORCH_CHECK(ka.numel == static_cast<int64_t>(a.Hkv) * a.D && va.numel == ka.numel,
              msg("one token's k and v must hold ", a.Hkv * a.D, " values"));
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                    t->dim() == 2 && t->size(0) >= a.S && t->size(1) == a.D,
                msg("cos and sin must be float32 [max_seq, ", a.D, "] tables"));
  at::Tensor q_out = at::empty({1, a.H, 1, a.D}, k_cache.options());
  a.q = qa.whole;
  a.k = ka.whole;
  a.v = va.whole;
  a.qp = qa.parts;
  a.kp = ka.parts;
  a.vp = va.parts;
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.pos = pos.data_ptr<int64_t>();
  a.q_out = q_out.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  check_launch(vptq::launch_rope_kv(a, dt, at::cuda::getCurrentCUDAStream()), "rope_kv");
  return q_out;
}

// A prefill's T tokens (q [1, T, H * D], k and v [1, T, Hkv * D], whole activations) at
// positions start .. start + T - 1: the rotated q [1, H, T, D] back, the rotated keys and the
// values into the caches; cos and sin hold the tokens' rows (the tables from row start on).
at::Tensor rope_kv_prefill_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cos, const at::Tensor& sin, int64_t start,
                                const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const c10::cuda::CUDAGuard guard(q.device());
  const vptq::DType dt = dtype_of(k_cache);
  check_cache(k_cache, k_cache, "k_cache");
  check_cache(v_cache, k_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  vptq::RopeArgs a;
  a.Hkv = static_cast<int>(k_cache.size(1));
  a.S = static_cast<int>(k_cache.size(2));
  a.D = static_cast<int>(k_cache.size(3));
  for (const auto* t : {&q, &k, &v}) {
    check_act(*t, k_cache, "q, k and v");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == 1,
                msg("q, k and v must be [1, T, heads * D], not ", t->sizes()));
  }
  const int64_t T = q.size(1);
  TORCH_CHECK(T >= 1 && T <= 65535 && k.size(1) == T && v.size(1) == T,
              msg("q, k and v must hold the same 1 .. 65535 tokens, not ", q.size(1), ", ",
                  k.size(1), ", ", v.size(1)));
  TORCH_CHECK(a.D % 2 == 0 && q.size(2) % a.D == 0,
              msg("q holds ", q.size(2), " values a token, not whole heads of ", a.D));
  a.H = static_cast<int>(q.size(2) / a.D);
  TORCH_CHECK(k.size(2) == static_cast<int64_t>(a.Hkv) * a.D && v.size(2) == k.size(2),
              msg("k and v must hold ", a.Hkv * a.D, " values a token"));
  TORCH_CHECK(start >= 0 && start + T <= a.S,
              msg("tokens ", start, " .. ", start + T - 1, " lie beyond the cache of ", a.S));
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                    t->dim() == 2 && t->size(0) >= T && t->size(1) == a.D,
                msg("cos and sin must be float32 [T, ", a.D, "] rows"));
  at::Tensor q_out = at::empty({1, a.H, T, a.D}, k_cache.options());
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.start = start;
  a.T = static_cast<int>(T);
  a.q_out = q_out.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  check_launch(vptq::launch_rope_kv(a, dt, at::cuda::getCurrentCUDAStream()), "rope_kv_prefill");
  return q_out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& pos,
                                 int64_t window, double scale, bool tensor_cores) {
  const c10::cuda::CUDAGuard guard(q.device());
  const vptq::DType dt = dtype_of(q);
  check_act(q, q, "q");
  vptq::AttnArgs a;
  check_kv(k_cache, v_cache, pos, q, a);
  TORCH_CHECK(q.numel() % a.D == 0, msg("q holds ", q.numel(), " values, not whole heads"));
  a.H = static_cast<int>(q.numel() / a.D);
  TORCH_CHECK(vptq::decode_attention_supported(a.H, a.Hkv, a.D),
              msg("decode attention does not take ", a.H, " query heads over ", a.Hkv,
                  " KV heads of dimension ", a.D, "; use scaled_dot_product_attention"));
  TORCH_CHECK(!tensor_cores || vptq::decode_attention_tensor_cores_supported(),
              msg("decode attention on the tensor cores needs compute capability 8.0 or later"));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  a.splits = vptq::decode_attention_splits(a.H, a.Hkv, a.S, sms, tensor_cores);
  a.tensor_cores = tensor_cores;
  at::Tensor out = at::empty({1, 1, static_cast<int64_t>(a.H) * a.D}, q.options());
  at::Tensor ws = at::empty({static_cast<int64_t>(a.H) * a.splits * (a.D + 2)},
                            q.options().dtype(at::kFloat));
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.pos = pos.data_ptr<int64_t>();
  a.out = out.data_ptr();
  a.ws = ws.data_ptr<float>();
  a.window = static_cast<int>(window);
  a.scale = static_cast<float>(scale);
  check_launch(vptq::launch_decode_attention(a, dt, at::cuda::getCurrentCUDAStream()),
               "decode_attention");
  return out;
}

at::Tensor silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up,
                         std::optional<at::ScalarType> dtype) {
  const c10::cuda::CUDAGuard guard(gate.device());
  // gate and up may come as partial sums; the activation dtype is then that of the other, or
  // dtype where both do
  at::ScalarType type = gate.scalar_type() != at::kFloat ? gate.scalar_type()
                        : up.scalar_type() != at::kFloat ? up.scalar_type()
                                                         : dtype.value_or(at::kFloat);
  TORCH_CHECK(!dtype.has_value() || *dtype == type,
              msg("silu_mul: dtype ", *dtype, " but the activations are ", type));
  const vptq::DType dt = dtype_of(type);
  const Act g = act_input(gate, type, "gate");
  const Act u = act_input(up, type, "up");
  TORCH_CHECK(g.sizes == u.sizes, msg("gate ", at::IntArrayRef(g.sizes), " and up ",
                                      at::IntArrayRef(u.sizes), " differ"));
  at::Tensor out = at::empty(g.sizes, gate.options().dtype(type));
  check_launch(vptq::launch_silu_mul(g.whole, g.parts, u.whole, u.parts, out.data_ptr(), g.numel,
                                     dt, at::cuda::getCurrentCUDAStream()),
               "silu_mul");
  return out;
}

// The checks gptq_gemv and gptq_dequant share: a GPTQ layer's tensors for K input rows.
void check_gptq_layer(const char* op, const at::Tensor& qweight, const at::Tensor& zeros,
                      const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits, int64_t K,
                      at::ScalarType type) {
  const int64_t N = qweight.size(-1);
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              msg(op, ": bits ", bits, " is not 2, 3, 4 or 8"));
  TORCH_CHECK(K % 32 == 0, msg(op, ": K = ", K, " is not a multiple of 32"));
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(0) == K * bits / 32,
              msg(op, ": qweight must be a contiguous int32 [", K * bits / 32, ", N]"));
  TORCH_CHECK(scales.scalar_type() == type && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(1) == N,
              msg(op, ": scales must be a contiguous ", type, " [G, ", N, "]"));
  TORCH_CHECK(zeros.scalar_type() == at::kInt && zeros.is_contiguous() &&
                  zeros.sizes() == scales.sizes(),
              msg(op, ": zeros must be a contiguous int32 of the scales' shape"));
  TORCH_CHECK(g_idx.scalar_type() == at::kInt && g_idx.is_contiguous() && g_idx.numel() == K,
              msg(op, ": g_idx must be a contiguous int32 [", K, "]"));
  for (const at::Tensor* t : {&qweight, &zeros, &scales, &g_idx})
    TORCH_CHECK(t->device() == qweight.device(), msg(op, ": the layer's tensors are on two devices"));
}

const int32_t* gptq_perm(const char* op, const OptTensor& perm, const at::Tensor& qweight,
                         int64_t K) {
  if (!perm.has_value()) return nullptr;
  TORCH_CHECK(perm->scalar_type() == at::kInt && perm->is_contiguous() && perm->numel() == K &&
                  perm->device() == qweight.device(),
              msg(op, ": perm must be a contiguous int32 [", K, "] beside qweight"));
  return perm->data_ptr<int32_t>();
}

at::Tensor gptq_dequant_cuda(const at::Tensor& qweight, const at::Tensor& zeros,
                             const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits,
                             int64_t n0, int64_t n1, const OptTensor& perm) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t K = g_idx.numel(), N = qweight.size(-1);
  check_gptq_layer("gptq_dequant", qweight, zeros, scales, g_idx, bits, K, scales.scalar_type());
  const vptq::DType dt = dtype_of(scales);
  TORCH_CHECK(0 <= n0 && n0 < n1 && n1 <= N,
              msg("gptq_dequant: columns ", n0, "..", n1, " are not within 0..", N));
  TORCH_CHECK(K / 32 <= 65535, msg("gptq_dequant: K = ", K, " is over 2097120"));
  at::Tensor out = at::empty({K, n1 - n0}, scales.options());
  vptq::GptqDequantArgs a{qweight.data_ptr<int32_t>(),
                          zeros.data_ptr<int32_t>(),
                          scales.data_ptr(),
                          g_idx.data_ptr<int32_t>(),
                          gptq_perm("gptq_dequant", perm, qweight, K),
                          out.data_ptr(),
                          N,
                          K,
                          n0,
                          n1 - n0,
                          static_cast<int>(bits),
                          dt};
  check_launch(vptq::launch_gptq_dequant(a, at::cuda::getCurrentCUDAStream()), "gptq_dequant");
  return out;
}

at::Tensor gptq_gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& zeros,
                          const at::Tensor& scales, const at::Tensor& g_idx, const OptTensor& bias,
                          int64_t bits, const OptTensor& perm, int64_t group_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const vptq::DType dt = dtype_of(x);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "gptq_gemv: x must be a contiguous [T, K]");
  const int64_t T = x.size(0), K = x.size(1), N = qweight.size(-1);
  check_gptq_layer("gptq_gemv", qweight, zeros, scales, g_idx, bits, K, x.scalar_type());
  check_float(bias, x, "bias");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "gptq_gemv: bias must have N values");
  TORCH_CHECK(0 <= group_size && group_size <= K,
              msg("gptq_gemv: group_size ", group_size, " is not within 0..", K));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor part = at::empty({vptq::gptq_splits(N, K, sms), T, N}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({T, N}, x.options());
  if (T == 0) return out;
  vptq::GptqArgs a{x.data_ptr(),
                   qweight.data_ptr<int32_t>(),
                   zeros.data_ptr<int32_t>(),
                   scales.data_ptr(),
                   g_idx.data_ptr<int32_t>(),
                   gptq_perm("gptq_gemv", perm, qweight, K),
                   static_cast<int>(group_size),
                   ptr(bias),
                   out.data_ptr(),
                   part.data_ptr<float>(),
                   N,
                   K,
                   T,
                   static_cast<int>(bits),
                   dt};
  check_launch(vptq::launch_gptq_gemv(a, sms, at::cuda::getCurrentCUDAStream()), "gptq_gemv");
  return out;
}

// A contiguous tensor of `type` on the device of the logits (the state a pick updates).
void check_beside(const at::Tensor& t, const at::Tensor& logits, at::ScalarType type,
                  const char* op, const char* name) {
  TORCH_CHECK(t.device() == logits.device() && t.scalar_type() == type && t.is_contiguous(),
              msg(op, ": ", name, " must be a contiguous ", type,
                  " tensor on the device of the logits"));
}

// The greedy pick of a decode step (vptq_decode.cu greedy_pick_kernel): token = argmax(logits),
// seen[token] = true, pos += 1, with nothing read back to the host (a CUDA graph holds it).
void greedy_pick_cuda(const at::Tensor& logits, const at::Tensor& token, const at::Tensor& seen,
                      const at::Tensor& pos, const at::Tensor& ticket) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_act(logits, logits, "logits");
  check_beside(token, logits, at::kLong, "greedy_pick", "token");
  check_beside(seen, logits, at::kBool, "greedy_pick", "seen");
  check_beside(pos, logits, at::kLong, "greedy_pick", "pos");
  check_beside(ticket, logits, at::kInt, "greedy_pick", "ticket");
  const int64_t V = logits.size(-1);
  TORCH_CHECK(logits.numel() == V && token.numel() == 1 && pos.numel() == 1 &&
                  seen.numel() == V && ticket.numel() == 1,
              msg("greedy_pick: one row of logits, one token, pos and ticket, and a seen mask "
                  "of the logits' length, got ", logits.numel(), " logits and ", seen.numel(),
                  " seen"));
  const int blocks = vptq::greedy_pick_blocks(V);
  at::Tensor wv = at::empty({blocks}, logits.options().dtype(at::kFloat));
  at::Tensor wi = at::empty({blocks}, logits.options().dtype(at::kLong));
  check_launch(vptq::launch_greedy_pick(logits.data_ptr(), V, wv.data_ptr<float>(),
                                        wi.data_ptr<int64_t>(), ticket.data_ptr<int32_t>(),
                                        token.data_ptr<int64_t>(), seen.data_ptr<bool>(),
                                        pos.data_ptr<int64_t>(), dtype_of(logits),
                                        at::cuda::getCurrentCUDAStream()),
               "greedy_pick");
}

// The sampled pick of a decode step (vptq_decode.cu sample_pick_kernel): of the tokens top-k,
// top-p and min-p keep at this temperature after the repetition penalty, the one with the
// largest p / noise (temperature 0: the greedy pick); seen[token] = true, pos += 1; nothing
// read back to the host. params (optional): float64 [temperature, top_p, min_p, top_k,
// repetition_penalty] on the GPU, read by the kernel in place of the five numbers (which are
// then only checked), so that a captured graph replays with whatever settings it holds then.
void sample_pick_cuda(const at::Tensor& logits, const at::Tensor& noise, const at::Tensor& token,
                      const at::Tensor& seen, const at::Tensor& pos, double temperature,
                      double top_p, double min_p, const OptTensor& params, int64_t top_k,
                      double repetition_penalty) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_act(logits, logits, "logits");
  check_beside(noise, logits, at::kFloat, "sample_pick", "noise");
  check_beside(token, logits, at::kLong, "sample_pick", "token");
  check_beside(seen, logits, at::kBool, "sample_pick", "seen");
  check_beside(pos, logits, at::kLong, "sample_pick", "pos");
  const int64_t V = logits.size(-1);
  TORCH_CHECK(logits.numel() == V && noise.numel() == V && token.numel() == 1 &&
                  pos.numel() == 1 && seen.numel() == V,
              msg("sample_pick: one row of logits, noise and a seen mask of the logits' length, "
                  "one token and pos; got ", logits.numel(), " logits, ", noise.numel(),
                  " noise, ", seen.numel(), " seen"));
  TORCH_CHECK(temperature >= 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p < 1 &&
                  top_k >= 0 && repetition_penalty > 0,
              msg("sample_pick: temperature ", temperature, " must be >= 0, top_p ", top_p,
                  " in (0, 1], min_p ", min_p, " in [0, 1), top_k ", top_k,
                  " >= 0 and repetition_penalty ", repetition_penalty, " > 0"));
  TORCH_CHECK(vptq::sample_pick_supported(V),
              msg("sample_pick: ", V, " logits is beyond what the kernel holds in shared "
                  "memory; use engine/sampling.py sample"));
  if (params) {
    check_beside(*params, logits, at::kDouble, "sample_pick", "params");
    TORCH_CHECK(params->numel() == 5,
                msg("sample_pick: params holds temperature, top_p, min_p, top_k and "
                    "repetition_penalty; got ",
                    params->numel(), " values"));
  }
  const cudaError_t err = vptq::launch_sample_pick(
      logits.data_ptr(), noise.data_ptr<float>(), V, static_cast<float>(temperature), top_p,
      static_cast<float>(min_p), top_k, static_cast<float>(repetition_penalty),
      params ? params->data_ptr<double>() : nullptr,
      token.data_ptr<int64_t>(), seen.data_ptr<bool>(), pos.data_ptr<int64_t>(),
      dtype_of(logits), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorNotSupported,
              "sample_pick needs compute capability 9.0 or later (thread block clusters); use "
              "engine/sampling.py sample");
  check_launch(err, "sample_pick");
}

// Rows of an embedding table [vocab, hidden] for CUDA ids; the table is a CUDA tensor or lies
// in pinned host memory (engine/loader.py keeps it there when the GPU is short of room), read
// through its device address: no host synchronisation, so a CUDA graph can hold it.
at::Tensor embed_rows_cuda(const at::Tensor& table, const at::Tensor& ids) {
  const c10::cuda::CUDAGuard guard(ids.device());
  TORCH_CHECK(ids.is_cuda() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "embed_rows: ids must be a contiguous CUDA int64 tensor");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.element_size() == 2,
              msg("embed_rows: the table must be a contiguous 2-D tensor of 16-bit floats, got ",
                  table.scalar_type(), " ", table.sizes()));
  const void* src = table.data_ptr();
  if (!table.is_cuda()) {
    TORCH_CHECK(table.is_pinned(),
                "embed_rows: a table in host memory must be pinned (tensor.pin_memory())");
    void* dev = nullptr;
    const cudaError_t err = cudaHostGetDevicePointer(&dev, table.data_ptr(), 0);
    TORCH_CHECK(err == cudaSuccess,
                msg("embed_rows: the pinned table has no device address (",
                    cudaGetErrorString(err), ")"));
    src = dev;
  } else {
    TORCH_CHECK(table.device() == ids.device(), "embed_rows: table and ids on different GPUs");
  }
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(table.size(1));
  at::Tensor out = at::empty(shape, ids.options().dtype(table.scalar_type()));
  check_launch(vptq::launch_embed_rows(src, ids.data_ptr<int64_t>(), out.data_ptr(), ids.numel(),
                                       table.size(0), table.size(1),
                                       at::cuda::getCurrentCUDAStream()),
               "embed_rows");
  return out;
}

}  // namespace

TORCH_LIBRARY(vptq, m) {
  m.def(
      "dequant(Tensor indices, Tensor centroids, Tensor? res_centroids, Tensor? outlier_indices, "
      "Tensor? outlier_centroids, Tensor? perm, Tensor? inv_perm, Tensor? weight_scale, "
      "Tensor? weight_bias, int[] meta) -> Tensor");
  m.def(
      "gemv(Tensor x, Tensor indices, Tensor centroids, Tensor? res_centroids, Tensor? perm, "
      "Tensor? weight_scale, Tensor? weight_bias, Tensor? bias, int[] meta) -> Tensor");
  m.def(
      "gemv_sliced(Tensor x, Tensor[] entries, Tensor?[] res_codes, Tensor[] offsets, "
      "Tensor[] table, Tensor?[] res_table, Tensor?[] weight_scale, Tensor?[] weight_bias, "
      "Tensor?[] bias, Tensor[] counters, int[] meta, bool partial=False) -> Tensor[]");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rope_kv(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache) -> Tensor");
  m.def(
      "rope_kv_prefill(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, int start, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window, "
      "float scale, bool tensor_cores=False) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up, ScalarType? dtype=None) -> Tensor");
  m.def(
      "gptq_gemv(Tensor x, Tensor qweight, Tensor zeros, Tensor scales, Tensor g_idx, "
      "Tensor? bias, int bits, Tensor? perm=None, int group_size=0) -> Tensor");
  m.def(
      "gptq_dequant(Tensor qweight, Tensor zeros, Tensor scales, Tensor g_idx, int bits, int n0, "
      "int n1, Tensor? perm=None) -> Tensor");
  m.def("embed_rows(Tensor table, Tensor ids) -> Tensor");
  m.def(
      "greedy_pick(Tensor logits, Tensor(a!) token, Tensor(b!) seen, Tensor(c!) pos, "
      "Tensor(d!) ticket) -> ()");
  m.def(
      "sample_pick(Tensor logits, Tensor noise, Tensor(a!) token, Tensor(b!) seen, "
      "Tensor(c!) pos, float temperature, float top_p, float min_p, Tensor? params=None, "
      "int top_k=0, float repetition_penalty=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(vptq, CUDA, m) {
  m.impl("dequant", &dequant_cuda);
  m.impl("gemv", &gemv_cuda);
  m.impl("gemv_sliced", &gemv_sliced_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rope_kv", &rope_kv_cuda);
  m.impl("rope_kv_prefill", &rope_kv_prefill_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("gptq_gemv", &gptq_gemv_cuda);
  m.impl("gptq_dequant", &gptq_dequant_cuda);
  m.impl("embed_rows", &embed_rows_cuda);
  m.impl("greedy_pick", &greedy_pick_cuda);
  m.impl("sample_pick", &sample_pick_cuda);
}
