// The per-element and per-layer math of TVLARS, LARS and LAMB (docs/algorithms.md).
//
// One header for both compilers: nvcc sees __host__ __device__ functions, g++ sees plain inline ones, so the
// CPU twin and the CUDA kernel cannot drift apart. Element-wise math takes and returns float32 values;
// storage dtypes are converted by the callers (one rounding on store). Norms are float64: squares of float32
// elements are summed in double (finite weights of |w| ~ 1e20 would overflow a float32 sum, and sums below
// 2^-126 would flush to zero), and the trust ratio is computed from those sums in double, then rounded once.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TVLARS_HD __host__ __device__ __forceinline__
#else
#define TVLARS_HD inline
#endif

namespace tvlars {

struct LarsHyper {
  float lr;
  float momentum;
  float weight_decay;
  double eta;  // eta, eps and norm_clip only enter the float64 trust ratio
  double eps;
  double norm_clip;  // only when has_norm_clip
  bool has_norm_clip;
  bool sum_of_norms;  // trust denominator ||g|| + beta*||w|| instead of ||g + beta*w||
  bool nesterov;
  bool use_phi;  // TVLARS; plain LARS has phi == 1
  float lmbda;
  float alpha;
  float delay;
  float gamma_min;
};

struct LambHyper {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;  // 1 - beta computed in float64 on the host, then rounded once
  float one_minus_beta2;
  float log_beta1;  // log(beta) computed in float64 on the host (bias correction without cancellation)
  float log_beta2;
  float eps;
  float weight_decay;
  double norm_clip;  // only when has_norm_clip; enters the float64 trust ratio
  bool has_norm_clip;
  bool bias_correction;
};

// TVLARS's time-varying factor. expf overflows to inf for large lmbda*(t-delay): 1/inf is 0, so phi is
// gamma_min, never NaN.
TVLARS_HD float tvlars_phi(float t, float lmbda, float alpha, float delay, float gamma_min) {
  return 1.0f / (alpha + expf(lmbda * (t - delay))) + gamma_min;
}

TVLARS_HD double clip_norm(double norm, bool has_clip, double clip) {
  return (has_clip && norm > clip) ? clip : norm;
}

// An element's square for the float64 sums: the float32 element widened first, so the square cannot overflow
// or underflow.
TVLARS_HD double square(float x) {
  const double d = x;
  return d * d;
}

// The gradient as the step sees it: divided by GradScaler's scale, times LAMB's global clip coefficient.
// Both factors are 1 when absent; dividing or multiplying by 1 is exact.
TVLARS_HD float effective_grad(float g, float grad_scale, float grad_mult) {
  return g / grad_scale * grad_mult;
}

// ---------------------------------------------------------------- LARS family

// d = g + beta*w for adapted layers; excluded layers take neither weight decay nor trust ratio (u = g).
TVLARS_HD float lars_decayed_grad(float g, float w, float weight_decay, bool excluded) {
  return excluded ? g : g + weight_decay * w;
}

// The square summed for the trust denominator: d for "norm_of_sum", g for "sum_of_norms".
TVLARS_HD float lars_denominator_term(float g, float d, bool sum_of_norms) {
  return sum_of_norms ? g : d;
}

// q from the layer's float64 sums of squares: w_sq = sum w^2, denom_sq = sum d^2 or sum g^2
// (lars_denominator_term), computed in float64 (phi in float32) and rounded once. Zero norms take the q = 1
// branch, so a zero-initialised layer or a zero gradient never gives NaN.
TVLARS_HD float lars_trust_ratio(const LarsHyper& h, double w_sq, double denom_sq, float t, bool excluded) {
  if (excluded) return 1.0f;
  const double wn = clip_norm(sqrt(w_sq), h.has_norm_clip, h.norm_clip);
  double dn = clip_norm(sqrt(denom_sq), h.has_norm_clip, h.norm_clip);
  if (h.sum_of_norms) dn += static_cast<double>(h.weight_decay) * wn;
  if (!(wn > 0.0 && dn > 0.0)) return 1.0f;
  const float factor = h.use_phi ? tvlars_phi(t, h.lmbda, h.alpha, h.delay, h.gamma_min) : 1.0f;
  return static_cast<float>(h.eta * static_cast<double>(factor) * wn / (dn + h.eps));
}

// u = q*d; buf = mu*buf + u; w -= lr * (nesterov ? u + mu*buf : buf). Updates w and buf in place.
TVLARS_HD void lars_apply(const LarsHyper& h, float lr, float q, float d, float& w, float& buf) {
  const float u = q * d;
  buf = h.momentum * buf + u;
  const float step_dir = h.nesterov ? u + h.momentum * buf : buf;
  w = w - lr * step_dir;
}

// ---------------------------------------------------------------- LAMB

// 1 - beta**t as -expm1(t*log(beta)): no cancellation when beta is close to 1.
TVLARS_HD float bias_correction(float t, float log_beta) {
  return -expm1f(t * log_beta);
}

// m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g, in place.
TVLARS_HD void lamb_moments(const LambHyper& h, float g, float& m, float& v) {
  m = h.beta1 * m + h.one_minus_beta1 * g;
  v = h.beta2 * v + (h.one_minus_beta2 * g) * g;
}

// The weight decay of a layer: none for excluded layers.
TVLARS_HD float lamb_decay(const LambHyper& h, bool excluded) {
  return excluded ? 0.0f : h.weight_decay;
}

// u = mh / (sqrt(vh) + eps) + decay*w, with mh = m/bc1, vh = v/bc2 (bc = 1 without bias correction).
TVLARS_HD float lamb_update(float m, float v, float w, float bc1, float bc2, float eps, float decay) {
  return (m / bc1) / (sqrtf(v / bc2) + eps) + decay * w;
}

// q = ||w|| / ||u|| from the layer's float64 sums of squares, in float64, rounded once.
TVLARS_HD float lamb_trust_ratio(const LambHyper& h, double w_sq, double u_sq, bool excluded) {
  const double wn = clip_norm(sqrt(w_sq), h.has_norm_clip, h.norm_clip);
  const double un = sqrt(u_sq);
  return (wn > 0.0 && un > 0.0 && !excluded) ? static_cast<float>(wn / un) : 1.0f;
}

}  // namespace tvlars
