// Masked attention for a few new tokens per sequence over a KV cache, on the CPU (fp32).
// See cpu_attention.py for why it exists and how it is built.
//
//   q     [b, T, H, D]    unit stride in D (any other strides)
//   k, v  [b, KVH, L, D]  unit stride in D (views of the cache: any other strides)
//   mask  [b, T, L] bool  contiguous; True = may attend
//   ->    [b, T, H, D]    contiguous: softmax(q k^T * scale, masked) v
//
// One task per (sequence, head), over the intra-op thread pool; each key and value row is
// read once for all T new tokens of the pair. Masked positions are
// skipped, not added as -inf, so a row's result depends only on its own q, keys, values
// and mask: not on the batch, the padding or the cache length (batch invariance). A row
// with no allowed position gets zeros.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <vector>

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask,
                     double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3,
              "attend: q [b,T,H,D], k/v [b,KVH,L,D], mask [b,T,L]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                  v.scalar_type() == torch::kFloat,
              "attend: float32 only");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous(),
              "attend: mask must be a contiguous bool tensor");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attend: the last dimension must be contiguous");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D &&
                  v.size(1) == KVH && v.size(2) == L && H % KVH == 0,
              "attend: shapes do not match");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == T && mask.size(2) == L,
              "attend: mask must be [b, T, L]");
  auto out = torch::empty({B, T, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qt = q.stride(1), qh = q.stride(2);
  const int64_t kb = k.stride(0), kh = k.stride(1), kl = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vl = v.stride(2);
  const int64_t group = H / KVH;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(T * L), top(T), total(T), acc(T * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const float* K = kp + b * kb + g * kh;
      const float* V = vp + b * vb + g * vh;
      const bool* M = mp + b * T * L;
      // scores: each key row is read once for all T queries
      for (int64_t t = 0; t < T; ++t) top[t] = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < L; ++l) {
        const float* Kr = K + l * kl;
        for (int64_t t = 0; t < T; ++t) {
          if (!M[t * L + l]) continue;
          const float* Q = qp + b * qb + t * qt + h * qh;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < D; ++j) dot += Q[j] * Kr[j];
          dot *= sc;
          score[t * L + l] = dot;
          if (dot > top[t]) top[t] = dot;
        }
      }
      // softmax numerators in place, and their sums
      for (int64_t t = 0; t < T; ++t) {
        float sum = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          if (!M[t * L + l]) continue;
          const float p = std::exp(score[t * L + l] - top[t]);
          score[t * L + l] = p;
          sum += p;
        }
        total[t] = sum;
      }
      // weighted values: each value row is read once for all T queries
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const float* Vr = V + l * vl;
        for (int64_t t = 0; t < T; ++t) {
          if (!M[t * L + l]) continue;
          const float p = score[t * L + l];
          float* A = acc.data() + t * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) A[j] += p * Vr[j];
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        float* O = op + ((b * T + t) * H + h) * D;
        const float inv = total[t] > 0.f ? 1.f / total[t] : 0.f;
        for (int64_t j = 0; j < D; ++j) O[j] = acc[t * D + j] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "masked attention of a few tokens per sequence over a KV cache");
}
