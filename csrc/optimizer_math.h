// The per-element and per-layer math of TVLARS, LARS and LAMB (docs/algorithms.md).
//
// One header for both compilers: nvcc sees __host__ __device__ functions, g++ sees plain inline ones, so the
// CPU twin and the CUDA kernel cannot drift apart. Element-wise math takes and returns float32 values;
// storage dtypes are converted by the callers (one rounding on store). Norms are float64: squares of float32
// elements are summed in double (finite weights of |w| ~ 1e20 would overflow a float32 sum, and sums below
// 2^-126 would flush to zero), and the trust ratio is computed from those sums in double, then rounded once.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TVLARS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, as nvcc's __forceinline__: the CPU twin's element loops vectorise only if nothing in them is a
// call, and GCC's heuristics leave some of these (the rounding, the Kahan split) out-of-line in the larger loops.
#define TVLARS_HD inline __attribute__((always_inline))
#else
#define TVLARS_HD inline
#endif

namespace tvlars {

struct LarsHyper {
  float lr;
  float momentum;
  float one_minus_dampening;  // 1 - dampening computed in float64 on the host, then rounded once
  float weight_decay;
  double eta;  // eta, eps, norm_clip and the bounds only enter the float64 trust ratio
  double eps;
  double norm_clip;  // only when has_norm_clip
  double min_trust_ratio;  // only when has_min_trust_ratio
  double max_trust_ratio;  // only when has_max_trust_ratio
  bool has_norm_clip;
  bool has_min_trust_ratio;
  bool has_max_trust_ratio;
  bool sum_of_norms;  // trust denominator ||g|| + beta*||w|| instead of ||g + beta*w||
  bool nesterov;
  bool use_phi;  // TVLARS; plain LARS has phi == 1
  bool trust_clip;  // LARC: q = min(q / lr, 1) on adapted layers
  bool adapt;  // false: no layer of the group takes a trust ratio (q = 1)
  float lmbda;
  float alpha;
  float delay;
  float gamma_min;
  // bfloat16 state (docs/algorithms.md, section 9): stochastic rounding from the stream of `seed`, else to nearest.
  // Float32 state ignores both.
  bool stochastic_rounding;
  uint32_t seed;
};

struct LambHyper {
  float lr;
  float beta1;
  float beta2;
  float first_moment_factor;  // the factor of g in m: 1 - beta1 computed in float64 on the host and rounded once,
                              // or 1 without grad averaging
  float one_minus_beta2;
  float log_beta1;  // log(beta) computed in float64 on the host (bias correction without cancellation)
  float log_beta2;
  float eps;
  float weight_decay;
  double norm_clip;  // only when has_norm_clip; enters the float64 trust ratio, as do the bounds
  double min_trust_ratio;  // only when has_min_trust_ratio
  double max_trust_ratio;  // only when has_max_trust_ratio
  bool has_norm_clip;
  bool has_min_trust_ratio;
  bool has_max_trust_ratio;
  bool bias_correction;
  bool decoupled_decay;  // w *= 1 - lr*beta' before the step, and no beta'*w in u
  bool adapt;  // false: no layer of the group takes a trust ratio (q = 1)
  bool stochastic_rounding;  // as LarsHyper's
  uint32_t seed;
};

// A computed trust ratio within [min_trust_ratio, max_trust_ratio] (each bound optional), in float64.
TVLARS_HD double bound_ratio(double q, bool has_min, double min_ratio, bool has_max, double max_ratio) {
  if (has_max && q > max_ratio) q = max_ratio;
  if (has_min && q < min_ratio) q = min_ratio;
  return q;
}

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

// d = g + beta'*w; a layer without weight decay takes d = g (beta' = 0, no 0*w term).
TVLARS_HD float lars_decayed_grad(float g, float w, float weight_decay, bool no_decay) {
  return no_decay ? g : g + weight_decay * w;
}

// The square summed for the trust denominator: d for "norm_of_sum", g for "sum_of_norms".
TVLARS_HD float lars_denominator_term(float g, float d, bool sum_of_norms) {
  return sum_of_norms ? g : d;
}

// q from the layer's float64 sums of squares: w_sq = sum w^2, denom_sq = sum d^2 or sum g^2
// (lars_denominator_term), computed in float64 (phi in float32) and rounded once. `decay` is the layer's beta',
// `lr` the step's (for LARC's clip). Zero norms (||w||, and ||d|| or for "sum_of_norms" ||g||) take the q = 1
// branch, so a zero-initialised layer or a zero gradient never gives NaN; only a computed ratio is bounded, and
// the clip applies to every adapted layer, the zero-norm q = 1 included (docs/algorithms.md, sections 4 and 8).
TVLARS_HD float lars_trust_ratio(const LarsHyper& h, double w_sq, double denom_sq, float t, float lr, float decay,
                                 bool adapted) {
  if (!adapted) return 1.0f;
  const double wn = clip_norm(sqrt(w_sq), h.has_norm_clip, h.norm_clip);
  const double other = clip_norm(sqrt(denom_sq), h.has_norm_clip, h.norm_clip);  // ||d||, or ||g||
  double q = 1.0;
  if (wn > 0.0 && other > 0.0) {
    const double dn = h.sum_of_norms ? other + static_cast<double>(decay) * wn : other;
    const float factor = h.use_phi ? tvlars_phi(t, h.lmbda, h.alpha, h.delay, h.gamma_min) : 1.0f;
    q = bound_ratio(h.eta * static_cast<double>(factor) * wn / (dn + h.eps), h.has_min_trust_ratio,
                    h.min_trust_ratio, h.has_max_trust_ratio, h.max_trust_ratio);
  }
  if (h.trust_clip) q = q >= static_cast<double>(lr) ? 1.0 : q / static_cast<double>(lr);  // 1 when lr == 0
  return static_cast<float>(q);
}

// u = q*d; buf = u at the layer's first step (first: t == 1), else mu*buf + (1 - dampening)*u;
// w -= lr * (nesterov ? u + mu*buf : buf). Updates w and buf in place.
// The two halves of lars_apply, for a step that stores the buffer between them (bfloat16 state is rounded when
// stored, and the weight's update uses the stored buffer, docs/algorithms.md section 9):
// the new buffer from u = q*d and the old one ...
TVLARS_HD float lars_momentum(const LarsHyper& h, float u, bool first, float buf) {
  return first ? u : h.momentum * buf + h.one_minus_dampening * u;
}

// ... and the new weight from u and the stored buffer (`nesterov`: h.nesterov, a parameter so that a CPU loop can
// take it as a compile-time constant).
TVLARS_HD float lars_new_weight(const LarsHyper& h, bool nesterov, float lr, float u, float buf, float w) {
  const float step_dir = nesterov ? u + h.momentum * buf : buf;
  return w - lr * step_dir;
}

TVLARS_HD void lars_apply(const LarsHyper& h, float lr, float q, float d, bool first, float& w, float& buf) {
  const float u = q * d;
  buf = lars_momentum(h, u, first, buf);
  w = lars_new_weight(h, h.nesterov, lr, u, buf, w);
}

// ---------------------------------------------------------------- LAMB

// 1 - beta**t as -expm1(t*log(beta)): no cancellation when beta is close to 1.
TVLARS_HD float bias_correction(float t, float log_beta) {
  return -expm1f(t * log_beta);
}

// m = b1*m + (1-b1)*g (or + g without grad averaging); v = b2*v + (1-b2)*g*g, in place.
TVLARS_HD void lamb_moments(const LambHyper& h, float g, float& m, float& v) {
  m = h.beta1 * m + h.first_moment_factor * g;
  v = h.beta2 * v + (h.one_minus_beta2 * g) * g;
}

// The beta' that enters u: the layer's decay (layer_decay), or none when the decay is decoupled.
TVLARS_HD float lamb_update_decay(const LambHyper& h, float decay) {
  return h.decoupled_decay ? 0.0f : decay;
}

// u = mh / (sqrt(vh) + eps) + decay*w, with mh = m/bc1, vh = v/bc2 (bc = 1 without bias correction).
TVLARS_HD float lamb_update(float m, float v, float w, float bc1, float bc2, float eps, float decay) {
  return (m / bc1) / (sqrtf(v / bc2) + eps) + decay * w;
}

// The factor the weights are multiplied by before the step: 1 - lr*beta' (formed in float64, rounded once) when
// the decay is decoupled, else 1 (exact: the coupled step's bits are unchanged).
TVLARS_HD float lamb_weight_keep(const LambHyper& h, float lr, float decay) {
  return h.decoupled_decay ? static_cast<float>(1.0 - static_cast<double>(lr) * static_cast<double>(decay)) : 1.0f;
}

// The new weight keep*w - lr_q*u: the decayed weight rounded first, as a separate decay step would leave it.
TVLARS_HD float lamb_apply(float keep, float w, float lr_q, float u) {
  const float decayed = keep * w;
  return decayed - lr_q * u;
}

// q = ||w|| / ||u|| from the layer's float64 sums of squares, in float64, bounded and rounded once; 1 for a layer
// that is not adapted or has a zero norm. With decoupled decay ||w|| is that of the decayed weights,
// |1 - lr*beta'| * ||w||, formed in float64 from the sums of the undecayed ones.
TVLARS_HD float lamb_trust_ratio(const LambHyper& h, double w_sq, double u_sq, float lr, float decay, bool adapted) {
  double wn = sqrt(w_sq);
  if (h.decoupled_decay) wn *= fabs(1.0 - static_cast<double>(lr) * static_cast<double>(decay));
  wn = clip_norm(wn, h.has_norm_clip, h.norm_clip);
  const double un = sqrt(u_sq);
  if (!(adapted && wn > 0.0 && un > 0.0)) return 1.0f;
  return static_cast<float>(
      bound_ratio(wn / un, h.has_min_trust_ratio, h.min_trust_ratio, h.has_max_trust_ratio, h.max_trust_ratio));
}

// ---------------------------------------------------------------- bfloat16 storage (docs/algorithms.md, section 9)
//
// State stored in bfloat16 is loaded to float32, the step's math is the float32 math above, and each stored value is
// rounded: to nearest-even, or stochastically with 16 random bits from a counter-based hash of (seed, the layer's step
// count, the layer's number, the state's stream, the element's index in the whole layer). The step continues with
// the stored value. tvlars_fused/_rounding.py and triton_kernels/common.py compute the same bits.

TVLARS_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

TVLARS_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// lowbias32 (a bijective integer hash), all arithmetic modulo 2^32.
TVLARS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The per-(seed, layer, stream) key: stream 0 is the first state tensor (momentum buffer, exp_avg), 1 the second.
TVLARS_HD uint32_t rounding_key(uint32_t seed, int64_t layer_id, int stream) {
  return mix32(seed ^ mix32(static_cast<uint32_t>(2 * layer_id + stream)));
}

// The per-step base from the key and the layer's step count t (after this step's increment).
TVLARS_HD uint32_t rounding_base(uint32_t key, float t) {
  return mix32(key ^ static_cast<uint32_t>(t));
}

// The 16 random bits of the element at `index` in the whole layer (the table's element offset + the local index).
TVLARS_HD uint32_t rounding_bits(uint32_t base, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return mix32((base ^ static_cast<uint32_t>(i)) + static_cast<uint32_t>(i >> 32) * 0x9E3779B9u) >> 16;
}

// All ones when b, else 0. The roundings below choose with masks instead of `?:`: GCC turns a select whose one side
// is a constant (NaN's 0x7FC0) into a branch, jump-threads it, and then cannot vectorise the CPU loops that store
// through them ("control flow in loop"); with masks they vectorise. On the GPU a mask costs what a select does.
TVLARS_HD uint32_t all_ones_if(bool b) {
  return 0u - static_cast<uint32_t>(b);
}

// The float32 bits of float32 bits u rounded to bfloat16 by adding `add` below the kept 16 bits (carrying into them)
// and clearing them; NaN to 0x7FC0'0000 (bfloat16 0x7FC0, as torch's conversion). No overflow: the largest finite
// or infinite u plus 0xFFFF stays below 2^32.
TVLARS_HD uint32_t bf16_round_f32_bits(uint32_t u, uint32_t add) {
  const uint32_t rounded = (u + add) & 0xFFFF0000u;
  const uint32_t nan = all_ones_if((u & 0x7FFFFFFFu) > 0x7F800000u);
  return (rounded & ~nan) | (0x7FC00000u & nan);
}

// rounding_bits in 32-bit arithmetic, for the element `d` places after one whose index has the low word lo0 and the
// high word hi0 (d < 2^32), given hi0_term = hi0 * 0x9E3779B9: the index's low word is lo0 + d modulo 2^32, and its
// high word is hi0, or hi0 + 1 where that sum wrapped. The same bits as rounding_bits(base, index), without the
// 64-bit lanes that cost the CPU's vectorised loops.
TVLARS_HD uint32_t rounding_bits_after(uint32_t base, uint32_t lo0, uint32_t hi0_term, uint32_t d) {
  const uint32_t lo = lo0 + d;
  return mix32((base ^ lo) + (hi0_term + (0x9E3779B9u & all_ones_if(lo < lo0)))) >> 16;
}

// float32 to the bit pattern of its nearest bfloat16 (ties to even); NaN to 0x7FC0, as torch's conversion.
TVLARS_HD uint16_t bf16_nearest_bits(float x) {
  const uint32_t u = float_bits(x);
  return static_cast<uint16_t>(bf16_round_f32_bits(u, 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float32 to a bfloat16 bit pattern rounded away from zero with probability (the dropped 16 bits) / 2^16, given 16
// random bits: the stored value's mean is x. NaN as bf16_nearest_bits.
TVLARS_HD uint16_t bf16_stochastic_bits(float x, uint32_t random_bits) {
  return static_cast<uint16_t>(bf16_round_f32_bits(float_bits(x), random_bits) >> 16);
}

// The float32 bits of the value a bfloat16 state element stores (its bfloat16 pattern in the high half):
// stochastically rounded with the element's 16 random bits, or to nearest (`stochastic` false: a mask, not a
// branch, chooses, and the bits go unused).
TVLARS_HD uint32_t bf16_round_for_store(float x, bool stochastic, uint32_t random_bits) {
  const uint32_t u = float_bits(x);
  const uint32_t pick = all_ones_if(stochastic);
  return bf16_round_f32_bits(u, (random_bits & pick) | ((0x7FFFu + ((u >> 16) & 1u)) & ~pick));
}

// The same with the random bits of the element at `index` of the stream `base`.
TVLARS_HD uint32_t bf16_store_f32_bits(float x, bool stochastic, uint32_t base, int64_t index) {
  return bf16_round_for_store(x, stochastic, rounding_bits(base, index));
}

TVLARS_HD float bf16_bits_to_float(uint16_t bits) {
  return float_from_bits(static_cast<uint32_t>(bits) << 16);
}

// The bit pattern a bfloat16 state element stores: stochastically rounded or nearest (`stochastic` false).
TVLARS_HD uint16_t bf16_store_bits(float x, bool stochastic, uint32_t base, int64_t index) {
  return static_cast<uint16_t>(bf16_store_f32_bits(x, stochastic, base, index) >> 16);
}

// The float32 value a bfloat16 state element holds once stored (bf16_store_bits): what the step continues with.
TVLARS_HD float bf16_stored_value(float x, bool stochastic, uint32_t base, int64_t index) {
  return float_from_bits(bf16_store_f32_bits(x, stochastic, base, index));
}

// How a layer's bfloat16 state is stored in one step: stochastically or to nearest, the bases of the two streams'
// random bits (stream 0: momentum buffer or exp_avg; 1: exp_avg_sq) for the layer's new step count t, and the index
// in the whole layer of the tensor's first element (the table's element offset). Element i of the local tensor
// draws rounding_bits(base, offset + i).
struct StateRounding {
  bool stochastic;
  uint32_t base0;
  uint32_t base1;
  int64_t offset;
};

TVLARS_HD StateRounding state_rounding(bool stochastic, uint32_t seed, int64_t layer_id, int64_t element_offset,
                                       float t) {
  return {stochastic, rounding_base(rounding_key(seed, layer_id, 0), t),
          rounding_base(rounding_key(seed, layer_id, 1), t), element_offset};
}

// Kahan compensation of a bfloat16 weight: the step reads param + comp (exact in float32) and stores the new float32
// weight w as param = nearest(w) and comp = nearest(w - param), the part of w the parameter could not hold.
struct KahanSplit {
  uint16_t param;
  uint16_t comp;
};

TVLARS_HD KahanSplit kahan_split(float w) {
  const uint16_t param = bf16_nearest_bits(w);
  return {param, bf16_nearest_bits(w - bf16_bits_to_float(param))};
}

}  // namespace tvlars
