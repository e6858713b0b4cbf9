// The serving runner's CPU kernels (familial.infer.native), float32:
// - decode_attention: one call per layer for a step of single-token rows, each in its own cache
//   slot. Per (row, KV head) it norms and rotates the row's key, writes key and value into the
//   cache, then norms, rotates and attends the query heads sharing that KV head over the slot's
//   positions 0..position, reading each cached key and value once for the whole group. No
//   padding is read: every row attends over its own length.
// - rms_norm, silu_mul, norm_rotate_: the element-wise steps around the products, one pass each
//   (torch runs RMSNorm as five passes on CPU, SiLU x up as two).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x), written so the compiler vectorises the loop calling it: 2^n * p(r) with x = n ln2 + r,
// |r| <= ln2/2, p a degree-6 Taylor polynomial (relative error below 2e-7, float rounding);
// x is clamped to [-87, 88], where 2^n stays a normal float.
inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// out = x * rsqrt(mean(x^2) + eps) * weight (the model's rms_norm).
void rms_normalize(const float* __restrict x, const float* __restrict weight, double eps, int64_t dim,
                   float* __restrict out) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < dim; ++i) squares += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(squares / dim + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) out[i] = x[i] * inverse * weight[i];
}

// rms_normalize (no weight: not normed), then rotary: out[i] = x[i] cos[i] - x[i+h] sin[i] for
// the first half, x[i] cos[i] + x[i-h] sin[i] for the second (the model's apply_rotary). `out`
// may be `x`; `normed` is scratch of `dim` floats.
void norm_and_rotate(const float* x, const float* weight, double eps, const float* cos, const float* sin,
                     int64_t dim, float* normed, float* out) {
  if (weight != nullptr) {
    rms_normalize(x, weight, eps, dim, normed);
  } else {
    std::copy(x, x + dim, normed);
  }
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = normed[i] * cos[i] - normed[i + half] * sin[i];
  for (int64_t i = half; i < dim; ++i) out[i] = normed[i] * cos[i] + normed[i - half] * sin[i];
}

// One query over `length` cached positions: softmax(q K^T) V into out. Dim > 0 fixes the head
// size at compile time, so the query and the running sum stay in registers.
template <int64_t Dim>
void attend(const float* __restrict q, const float* __restrict keys, const float* __restrict values, int64_t length,
            int64_t runtime_dim, std::vector<float>& scores, float* __restrict out) {
  const int64_t dim = Dim > 0 ? Dim : runtime_dim;
  scores.resize(length);
  float* __restrict s = scores.data();
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < length; ++j) {
    const float* __restrict k = keys + j * dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < dim; ++i) dot += q[i] * k[i];
    s[j] = dot;
    largest = std::max(largest, dot);
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < length; ++j) {
    s[j] = exp_clamped(s[j] - largest);
    total += s[j];
  }
  float sum[Dim > 0 ? Dim : 512] = {};
  for (int64_t j = 0; j < length; ++j) {
    const float* __restrict v = values + j * dim;
    const float p = s[j];
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) sum[i] += p * v[i];
  }
  const float inverse = 1.f / total;
  for (int64_t i = 0; i < dim; ++i) out[i] = sum[i] * inverse;
}

template <int64_t Dim>
at::Tensor decode_attention_for(const at::Tensor& qkv, const std::optional<at::Tensor>& qk_norm, double eps,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                            const at::Tensor& slots, const at::Tensor& positions, int64_t q_heads, double scale) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && (!qk_norm.has_value() || qk_norm->scalar_type() == at::kFloat),
              "decode_attention: float32 tensors expected");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
                  positions.is_contiguous(), "decode_attention: slots and positions must be contiguous int64");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "decode_attention: qkv must be contiguous (rows, features)");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && values.sizes() == keys.sizes(),
              "decode_attention: keys and values must be contiguous (slots, kv_heads, max_len, head_dim)");
  const int64_t rows = qkv.size(0), kv_heads = keys.size(1), max_len = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(q_heads % kv_heads == 0, "decode_attention: ", q_heads, " query heads for ", kv_heads, " KV heads");
  const int64_t group = q_heads / kv_heads;
  TORCH_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * dim, "decode_attention: qkv width ", qkv.size(1));
  TORCH_CHECK(slots.numel() == rows && positions.numel() == rows, "decode_attention: one slot and position per row");
  TORCH_CHECK(cos.dim() == 3 && cos.size(1) == rows && cos.size(2) == dim && sin.sizes() == cos.sizes() &&
                  sin.stride(1) == cos.stride(1) && cos.stride(2) == 1 && sin.stride(2) == 1,
              "decode_attention: cos and sin must be (1, rows, head_dim) with the same layout");
  TORCH_CHECK(!qk_norm.has_value() || (qk_norm->is_contiguous() && qk_norm->numel() == (q_heads + kv_heads) * dim),
              "decode_attention: qk_norm must be contiguous (q_heads + kv_heads, head_dim)");
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  const int64_t* position_data = positions.data_ptr<int64_t>();
  // Rows write their slot's cache in parallel: two rows of one slot would race.
  std::vector<bool> taken(keys.size(0));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t slot = slot_data[row], position = position_data[row];
    TORCH_CHECK(slot >= 0 && slot < keys.size(0) && position >= 0 && position < max_len, "decode_attention: row ",
                row, " at slot ", slot, " position ", position, " is outside the cache");
    TORCH_CHECK(!taken[slot], "decode_attention: slot ", slot, " has two rows");
    taken[slot] = true;
  }
  auto out = at::empty({rows, q_heads * dim}, qkv.options());
  const float* qkv_data = qkv.data_ptr<float>();
  const float* norm_data = qk_norm.has_value() ? qk_norm->data_ptr<float>() : nullptr;
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  const int64_t rotary_stride = cos.stride(1);
  float* key_data = keys.data_ptr<float>();
  float* value_data = values.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t width = qkv.size(1);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), scores, normed(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, head = task % kv_heads;
      const int64_t slot = slot_data[row], position = position_data[row], length = position + 1;
      const float* x = qkv_data + row * width;
      const float* row_cos = cos_data + row * rotary_stride;
      const float* row_sin = sin_data + row * rotary_stride;
      float* slot_keys = key_data + (slot * kv_heads + head) * max_len * dim;
      float* slot_values = value_data + (slot * kv_heads + head) * max_len * dim;
      norm_and_rotate(x + (q_heads + head) * dim, norm_data ? norm_data + (q_heads + head) * dim : nullptr, eps,
                      row_cos, row_sin, dim, normed.data(), slot_keys + position * dim);
      const float* v = x + (q_heads + kv_heads + head) * dim;
      std::copy(v, v + dim, slot_values + position * dim);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t q_head = head * group + g;
        norm_and_rotate(x + q_head * dim, norm_data ? norm_data + q_head * dim : nullptr, eps, row_cos, row_sin,
                        dim, normed.data(), query.data() + g * dim);
        for (int64_t i = 0; i < dim; ++i) query[g * dim + i] *= static_cast<float>(scale);
      }
      for (int64_t g = 0; g < group; ++g) {
        attend<Dim>(query.data() + g * dim, slot_keys, slot_values, length, dim, scores,
                    out_data + row * q_heads * dim + (head * group + g) * dim);
      }
    }
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& qkv, const std::optional<at::Tensor>& qk_norm, double eps,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                            const at::Tensor& slots, const at::Tensor& positions, int64_t q_heads, double scale) {
  const int64_t dim = keys.size(3);
  TORCH_CHECK(dim <= 512 && dim % 2 == 0, "decode_attention: head_dim ", dim, " (expected even, at most 512)");
  auto run = dim == 64 ? decode_attention_for<64> : dim == 128 ? decode_attention_for<128> : decode_attention_for<0>;
  return run(qkv, qk_norm, eps, cos, sin, keys, values, slots, positions, q_heads, scale);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.is_contiguous() &&
                  weight.is_contiguous() && weight.numel() == x.size(-1),
              "rms_norm: contiguous float32 x (..., hidden) and weight (hidden) expected");
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto out = at::empty_like(x);
  const float* x_data = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      rms_normalize(x_data + row * hidden, w, eps, hidden, out_data + row * hidden);
    }
  });
  return out;
}

// (rows, 2F) gate and up side by side -> (rows, F) silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2 && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0, "silu_mul: contiguous float32 (rows, 2 * features) expected");
  const int64_t rows = gate_up.size(0), features = gate_up.size(1) / 2;
  auto out = at::empty({rows, features}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* __restrict gate = in + row * 2 * features;
      const float* __restrict up = gate + features;
      float* __restrict o = out_data + row * features;
#pragma omp simd
      for (int64_t i = 0; i < features; ++i) o[i] = gate[i] / (1.f + exp_clamped(-gate[i])) * up[i];
    }
  });
  return out;
}

// In place on heads (tokens, all heads, head_dim), contiguous: the first `count` heads of every
// token normed (weight: one row per head, or none) and rotated by the token's cos/sin (1, tokens, D).
void norm_rotate_(at::Tensor& heads, const std::optional<at::Tensor>& weight, double eps, const at::Tensor& cos,
                  const at::Tensor& sin, int64_t count) {
  TORCH_CHECK(heads.scalar_type() == at::kFloat && heads.dim() == 3 && heads.is_contiguous() &&
                  count <= heads.size(1), "norm_rotate_: contiguous float32 (tokens, heads, head_dim) expected");
  const int64_t tokens = heads.size(0), width = heads.size(1), dim = heads.size(2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 3 && cos.size(1) == tokens && cos.size(2) == dim &&
                  sin.sizes() == cos.sizes() && sin.stride(1) == cos.stride(1) && cos.stride(2) == 1 &&
                  sin.stride(2) == 1, "norm_rotate_: cos and sin must be (1, tokens, head_dim) with the same layout");
  TORCH_CHECK(!weight.has_value() || (weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                                      weight->numel() == count * dim),
              "norm_rotate_: weight must be contiguous float32 (count, head_dim)");
  TORCH_CHECK(dim % 2 == 0 && dim <= 512, "norm_rotate_: head_dim ", dim, " (expected even, at most 512)");
  float* data = heads.data_ptr<float>();
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  const int64_t stride = cos.stride(1);
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    float normed[512];
    for (int64_t token = begin; token < end; ++token) {
      for (int64_t head = 0; head < count; ++head) {
        float* x = data + (token * width + head) * dim;
        norm_and_rotate(x, w ? w + head * dim : nullptr, eps, cos_data + token * stride, sin_data + token * stride,
                        dim, normed, x);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(familial, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("norm_rotate_(Tensor(a!) heads, Tensor? weight, float eps, Tensor cos, Tensor sin, int count) -> ()");
  m.def("decode_attention(Tensor qkv, Tensor? qk_norm, float eps, Tensor cos, Tensor sin, Tensor(a!) keys, "
        "Tensor(b!) values, Tensor slots, Tensor positions, int q_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(familial, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("norm_rotate_", &norm_rotate_);
  m.impl("decode_attention", &decode_attention);
}
