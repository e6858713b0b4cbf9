// The serving runner's CPU kernels (familial.infer.native), float32:
// - attention: one call per layer for a packed call whose rows (decoding steps, prompt chunks,
//   verification rows) each hold a cache slot of their own. Every token's key is normed, rotated
//   and written into the cache with its value, its queries normed and rotated; then each (row,
//   KV head, block of tokens) attends causally over the slot's own prefix: no padding is read,
//   and the query heads sharing a KV head read each cached key and value together. A decoding
//   row takes the one-query path (a dot product per key); a prompt chunk's block scores 16 keys
//   at a time against all its queries.
// - rms_norm, silu_mul: the element-wise steps around the products, one pass each (torch runs
//   RMSNorm as five passes on CPU, SiLU x up as two); norm_rotate_: queries' and keys' norm and
//   rotary in place, for a call attending on torch's kernels (two rows in one slot).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
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

// Softmax weights of scores s[0..n) whose largest is `largest`: exp(s[j] - largest) in place;
// returns 1 / their sum, the factor that normalises the weighed values.
inline float exponentiate(float* __restrict s, int64_t n, float largest) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_clamped(s[j] - largest);
    total += s[j];
  }
  return 1.f / total;
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
  const float inverse = exponentiate(s, length, largest);
  float sum[Dim > 0 ? Dim : 512] = {};
  for (int64_t j = 0; j < length; ++j) {
    const float* __restrict v = values + j * dim;
    const float p = s[j];
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) sum[i] += p * v[i];
  }
  for (int64_t i = 0; i < dim; ++i) out[i] = sum[i] * inverse;
}

// Scratch of one thread of `attention`, reused between its tasks.
struct Scratch {
  std::vector<float> scores, inverses;
  std::vector<const float*> queries;
};

constexpr int64_t kKeyBlock = 16;
// 16 floats: one AVX-512 register (two AVX2 ones); GCC and Clang lower it to what -march allows.
typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Scores of queries[0..count) against keys start..start+15 (as 16 rows of `block`, transposed:
// block[d] holds dimension d of the 16 keys), four queries at a time so each key row loaded
// serves four fused multiply-adds.
template <int64_t Dim>
void score_block(const float* const* queries, int64_t count, const Vec16* block, float* scores, int64_t padded) {
  int64_t m = 0;
  for (; m + 4 <= count; m += 4) {
    Vec16 a = {}, b = {}, c = {}, d = {};
    for (int64_t i = 0; i < Dim; ++i) {
      a += queries[m][i] * block[i];
      b += queries[m + 1][i] * block[i];
      c += queries[m + 2][i] * block[i];
      d += queries[m + 3][i] * block[i];
    }
    std::memcpy(scores + m * padded, &a, sizeof(a));
    std::memcpy(scores + (m + 1) * padded, &b, sizeof(b));
    std::memcpy(scores + (m + 2) * padded, &c, sizeof(c));
    std::memcpy(scores + (m + 3) * padded, &d, sizeof(d));
  }
  for (; m < count; ++m) {
    Vec16 a = {};
    for (int64_t i = 0; i < Dim; ++i) a += queries[m][i] * block[i];
    std::memcpy(scores + m * padded, &a, sizeof(a));
  }
}

// out = sum_j p[j] values[j] * inverse over j < visible, the sum kept in registers.
template <int64_t Dim>
void weigh_values(const float* __restrict p, const float* __restrict values, int64_t visible, float inverse,
                  float* __restrict out) {
  Vec16 sum[Dim / 16] = {};
  for (int64_t j = 0; j < visible; ++j) {
    const float* v = values + j * Dim;
    for (int64_t c = 0; c < Dim / 16; ++c) sum[c] += p[j] * load16(v + 16 * c);
  }
  for (int64_t c = 0; c < Dim / 16; ++c) {
    const Vec16 scaled = sum[c] * inverse;
    std::memcpy(out + 16 * c, &scaled, sizeof(scaled));
  }
}

// Queries of `count` consecutive tokens of one row (positions first..first+count-1), the `group`
// query heads of one KV head each, causally over the slot's keys 0..first+count-1: scores per
// block of 16 keys (the block transposed once for all the queries), softmax per query, then the
// values weighed. `query(t, g)` points at a scaled, normed, rotated query; `output(t, g)` at its
// output. Head sizes 64 and 128 (multiples of 16).
template <int64_t Dim, typename Query, typename Output>
void attend_tokens(Query query, Output output, int64_t count, int64_t group, int64_t first,
                   const float* __restrict keys, const float* __restrict values, Scratch& scratch) {
  static_assert(Dim % 16 == 0, "head sizes of whole 16-float vectors");
  const int64_t length = first + count, padded = (length + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t queries = count * group;
  scratch.scores.resize(queries * padded);
  scratch.inverses.resize(queries);
  scratch.queries.resize(queries);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t g = 0; g < group; ++g) scratch.queries[t * group + g] = query(t, g);
  }
  Vec16 block[Dim];
  for (int64_t start = 0; start < length; start += kKeyBlock) {
    const int64_t width = std::min(kKeyBlock, length - start);
    for (int64_t d = 0; d < Dim; ++d) {
      for (int64_t j = 0; j < kKeyBlock; ++j) block[d][j] = j < width ? keys[(start + j) * Dim + d] : 0.f;
    }
    // Tokens before `start` see none of this block.
    const int64_t seeing = std::max<int64_t>(0, start - first) * group;
    score_block<Dim>(scratch.queries.data() + seeing, queries - seeing, block,
                     scratch.scores.data() + seeing * padded + start, padded);
  }
  for (int64_t t = 0; t < count; ++t) {
    const int64_t visible = first + t + 1;
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict s = scratch.scores.data() + (t * group + g) * padded;
      float largest = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) largest = std::max(largest, s[j]);
      weigh_values<Dim>(s, values, visible, exponentiate(s, visible, largest), output(t, g));
    }
  }
}

// Tokens of a task: a prompt chunk's queries attend 32 tokens (times the group's heads) at a
// time, sharing each transposed key block.
constexpr int64_t kQueryBlock = 32;

template <int64_t Dim>
at::Tensor attention_for(const at::Tensor& qkv, const std::optional<at::Tensor>& qk_norm, double eps,
                         const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                         const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& lengths,
                         int64_t q_heads, double scale) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && (!qk_norm.has_value() || qk_norm->scalar_type() == at::kFloat),
              "attention: float32 tensors expected");
  for (const at::Tensor* index : {&slots, &starts, &lengths}) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous() && index->dim() == 1 &&
                    index->numel() == slots.numel(),
                "attention: slots, starts and lengths must be contiguous int64, one per row");
  }
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "attention: qkv must be contiguous (tokens, features)");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && values.sizes() == keys.sizes(),
              "attention: keys and values must be contiguous (slots, kv_heads, max_len, head_dim)");
  const int64_t tokens = qkv.size(0), rows = slots.numel();
  const int64_t kv_heads = keys.size(1), max_len = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(q_heads % kv_heads == 0, "attention: ", q_heads, " query heads for ", kv_heads, " KV heads");
  const int64_t group = q_heads / kv_heads;
  TORCH_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * dim, "attention: qkv width ", qkv.size(1));
  TORCH_CHECK(cos.dim() == 3 && cos.size(1) == tokens && cos.size(2) == dim && sin.sizes() == cos.sizes() &&
                  sin.stride(1) == cos.stride(1) && cos.stride(2) == 1 && sin.stride(2) == 1,
              "attention: cos and sin must be (1, tokens, head_dim) with the same layout");
  TORCH_CHECK(!qk_norm.has_value() || (qk_norm->is_contiguous() && qk_norm->numel() == (q_heads + kv_heads) * dim),
              "attention: qk_norm must be contiguous (q_heads + kv_heads, head_dim)");
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  // Rows write their slot's cache in parallel: two rows of one slot would race.
  std::vector<bool> taken(keys.size(0));
  std::vector<int64_t> offsets(rows + 1, 0), row_of(tokens);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t slot = slot_data[row], start = start_data[row], length = length_data[row];
    TORCH_CHECK(slot >= 0 && slot < keys.size(0) && start >= 0 && length >= 1 && start + length <= max_len,
                "attention: row ", row, " at slot ", slot, " positions ", start, "..", start + length - 1,
                " is outside the cache");
    offsets[row + 1] = offsets[row] + length;
  }
  TORCH_CHECK(offsets[rows] == tokens, "attention: the rows hold ", offsets[rows], " tokens, qkv ", tokens);
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(!taken[slot_data[row]], "attention: slot ", slot_data[row], " has two rows");
    taken[slot_data[row]] = true;
    std::fill(row_of.begin() + offsets[row], row_of.begin() + offsets[row + 1], row);
  }
  const float* qkv_data = qkv.data_ptr<float>();
  const float* norm_data = qk_norm.has_value() ? qk_norm->data_ptr<float>() : nullptr;
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  const int64_t rotary_stride = cos.stride(1), width = qkv.size(1);
  float* key_data = keys.data_ptr<float>();
  float* value_data = values.data_ptr<float>();
  // The output holds the queries until each task overwrites the ones it attended with.
  auto out = at::empty({tokens, q_heads * dim}, qkv.options());
  float* out_data = out.data_ptr<float>();
  const float query_scale = static_cast<float>(scale);

  // Every token's key and value into the cache, its queries normed, rotated and scaled, before
  // any token reads the cache.
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> normed(dim);
    for (int64_t token = begin; token < end; ++token) {
      const int64_t row = row_of[token], position = start_data[row] + token - offsets[row];
      const float* x = qkv_data + token * width;
      const float* token_cos = cos_data + token * rotary_stride;
      const float* token_sin = sin_data + token * rotary_stride;
      for (int64_t head = 0; head < kv_heads; ++head) {
        const int64_t cached = ((slot_data[row] * kv_heads + head) * max_len + position) * dim;
        norm_and_rotate(x + (q_heads + head) * dim, norm_data ? norm_data + (q_heads + head) * dim : nullptr, eps,
                        token_cos, token_sin, dim, normed.data(), key_data + cached);
        const float* v = x + (q_heads + kv_heads + head) * dim;
        std::copy(v, v + dim, value_data + cached);
      }
      float* q = out_data + token * q_heads * dim;
      for (int64_t head = 0; head < q_heads; ++head) {
        norm_and_rotate(x + head * dim, norm_data ? norm_data + head * dim : nullptr, eps, token_cos, token_sin, dim,
                        normed.data(), q + head * dim);
        for (int64_t i = 0; i < dim; ++i) q[head * dim + i] *= query_scale;
      }
    }
  });

  // Tasks: (row, KV head, up to kQueryBlock tokens), largest first, taken by the threads in
  // turn, so a long prompt's blocks do not all land on one thread.
  struct Task {
    int64_t row, head, first, count, cost;
  };
  std::vector<Task> tasks;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t first = 0; first < length_data[row]; first += kQueryBlock) {
      const int64_t count = std::min(kQueryBlock, length_data[row] - first);
      for (int64_t head = 0; head < kv_heads; ++head) {
        tasks.push_back({row, head, first, count, count * (start_data[row] + first + count)});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t task_count = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), task_count), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    std::vector<float> query;
    for (int64_t i = next++; i < task_count; i = next++) {
      const Task& task = tasks[i];
      const int64_t slot = slot_data[task.row], first_token = offsets[task.row] + task.first;
      const float* slot_keys = key_data + (slot * kv_heads + task.head) * max_len * dim;
      const float* slot_values = value_data + (slot * kv_heads + task.head) * max_len * dim;
      auto at = [&](int64_t t, int64_t g) {
        return out_data + ((first_token + t) * q_heads + task.head * group + g) * dim;
      };
      const int64_t first = start_data[task.row] + task.first;
      if constexpr (Dim > 0) {
        if (task.count > 1) {
          attend_tokens<Dim>(at, at, task.count, group, first, slot_keys, slot_values, scratch);
          continue;
        }
      }
      for (int64_t t = 0; t < task.count; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          float* q = at(t, g);
          query.assign(q, q + dim);
          attend<Dim>(query.data(), slot_keys, slot_values, first + t + 1, dim, scratch.scores, q);
        }
      }
    }
  });
  return out;
}

// Rows of any length (decoding steps, prompt chunks, speculative verification), each in a cache
// slot of its own, laid end to end in qkv (the fused projection's output); the row's tokens sit
// at positions starts[i].. of slots[i] and attend causally over that slot's prefix.
at::Tensor attention(const at::Tensor& qkv, const std::optional<at::Tensor>& qk_norm, double eps,
                     const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                     const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& lengths, int64_t q_heads,
                     double scale) {
  const int64_t dim = keys.size(3);
  TORCH_CHECK(dim <= 512 && dim % 2 == 0, "attention: head_dim ", dim, " (expected even, at most 512)");
  auto run = dim == 64 ? attention_for<64> : dim == 128 ? attention_for<128> : attention_for<0>;
  return run(qkv, qk_norm, eps, cos, sin, keys, values, slots, starts, lengths, q_heads, scale);
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
  m.def("attention(Tensor qkv, Tensor? qk_norm, float eps, Tensor cos, Tensor sin, Tensor(a!) keys, "
        "Tensor(b!) values, Tensor slots, Tensor starts, Tensor lengths, int q_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(familial, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("norm_rotate_", &norm_rotate_);
  m.impl("attention", &attention);
}
