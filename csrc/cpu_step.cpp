// The CPU twin of the CUDA kernel: same layer table, same math header, same phases, same sums.
//
// Pass 1 writes each chunk's float64 partial sums of squares to the workspace (LAMB also updates the moments
// here); the per-layer step reduces a layer's partials in chunk order (no atomics, so two runs are
// bit-identical whatever the thread count), advances the step count once and computes the trust ratio;
// pass 2 applies the update. A split step (StepPhase) runs pass 1 and the reduction only, storing the sums,
// or takes the sums as given and runs the per-layer step and pass 2 only.
//
// Memory bounds the step (once the arithmetic is vectorised), and pass 2 re-reads what pass 1 read. So the
// bucket is walked in groups of consecutive layers whose pass-1 bytes fit in the threads' caches
// (kGroupBytesPerThread each): every thread sums its share of a group's chunks, the group's layers are
// finished, and each thread updates the same chunks, last read first, while they are still in its cache.
// A layer larger than that is a group of its own: its second pass re-reads from cache only the part each
// thread read last. Where a chunk is summed, and by which thread, never changes its sums, and a layer's sum
// is always its chunks' partials in chunk order: the results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "layer_table.h"
#include "optimizer_math.h"
#include "step_inputs.h"
#include "step_ops.h"

namespace tvlars {
namespace {

// Pass-1 bytes of one group, per thread of the team: half of a 512 KB L2 (the other half holds what pass 2
// streams through). On the shared 2-core development VM the L3 behind it is polluted by other tenants, so only
// the private L2 could be counted on: ResNet-50's TVLARS step, 1 thread, was ~1.5x fused SGD's time with
// groups of 64 KB to 16 MB against ~1.8x with the whole bucket as one group (differences between group sizes
// were within the machine's noise).
constexpr int64_t kGroupBytesPerThread = int64_t{256} << 10;
// Elements below which one thread does the whole step: waking a second costs more than it saves.
constexpr int64_t kElementsPerThread = 32768;
// When splitting a group among threads, a chunk costs this many elements' time besides its own elements.
constexpr int64_t kChunkCost = 64;

// Sums of squares go to kLanes independent float64 accumulators (lane j takes elements begin + j,
// begin + j + kLanes, ...), summed in lane order at the end: the order depends neither on the thread count
// nor on addresses, and `omp simd` on the lane loop vectorises it without -ffast-math.
constexpr int kLanes = 16;

// The chunk functions, where the time goes, are compiled twice, for AVX2 and for any x86-64 (or the default
// target elsewhere), and the CPU picks one at load time: the library stays portable (no -march) and gets
// 32-byte vectors where they exist. Not FMA: fused multiply-adds would round differently from the default clone.
#if defined(__x86_64__) && defined(__GNUC__)
#define TVLARS_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TVLARS_CPU_CLONES
#endif
#if defined(__GNUC__)
#define TVLARS_ALWAYS_INLINE __attribute__((always_inline))
#else
#define TVLARS_ALWAYS_INLINE
#endif

// The gradient as the step sees it. kScaled is false when the scale and multiplier are both 1: dividing and
// multiplying by 1 is exact, so skipping them changes no bit and saves a division per element and pass.
template <bool kScaled>
TVLARS_ALWAYS_INLINE inline float step_grad(float g, float grad_scale, float grad_mult) {
  return kScaled ? effective_grad(g, grad_scale, grad_mult) : g;
}

inline double ordered_sum(const double (&lanes)[kLanes]) {
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

struct CpuTable {
  const int64_t* rows;
  const int32_t* chunk_layer;
  int64_t num_layers;
  int64_t num_chunks;
  int64_t chunk_size;
  double* chunk_partials;  // [num_chunks][2]
  double* layer_results;   // [num_layers][2]: trust ratio, new step count
  int64_t phase;           // StepPhase
  double* layer_sums;      // [num_layers][2]: written by PHASE_SUMS, read by PHASE_APPLY; else nullptr
  const int64_t* row(int64_t layer) const { return rows + layer * NUM_COLS; }
  const int64_t* row_of_chunk(int64_t c) const { return row(chunk_layer[c]); }
};

// Consecutive layers [layer_begin, layer_end) and their chunks [chunk_begin, chunk_end).
struct Group {
  int64_t layer_begin;
  int64_t layer_end;
  int64_t chunk_begin;
  int64_t chunk_end;
};

// The group starting at `layer`: layers are added while their pass-1 bytes (bytes_of(row)) fit in `budget`;
// a layer larger than that is alone.
template <typename BytesOf>
inline Group next_group(const CpuTable& tab, int64_t layer, int64_t budget, BytesOf bytes_of) {
  int64_t end = layer + 1;
  int64_t bytes = bytes_of(tab.row(layer));
  while (end < tab.num_layers && bytes + bytes_of(tab.row(end)) <= budget) bytes += bytes_of(tab.row(end++));
  const int64_t* last = tab.row(end - 1);
  return {layer, end, tab.row(layer)[COL_FIRST_CHUNK], last[COL_FIRST_CHUNK] + last[COL_NUM_CHUNKS]};
}

// The first chunk of the group at which `target` of its work (elements + kChunkCost per chunk) is done.
inline int64_t split_point(const CpuTable& tab, const Group& g, int64_t target) {
  int64_t done = 0;
  for (int64_t layer = g.layer_begin; layer < g.layer_end; ++layer) {
    const int64_t* row = tab.row(layer);
    const int64_t work = row[COL_NUMEL] + kChunkCost * row[COL_NUM_CHUNKS];
    if (done + work > target) {
      const int64_t into = (target - done + tab.chunk_size + kChunkCost - 1) / (tab.chunk_size + kChunkCost);
      return row[COL_FIRST_CHUNK] + std::min(into, row[COL_NUM_CHUNKS]);
    }
    done += work;
  }
  return g.chunk_end;
}

// This thread's contiguous share of the group's chunks, balanced by work.
inline ElementRange thread_share(const CpuTable& tab, const Group& g, int64_t work) {
  const int64_t threads = omp_get_num_threads();
  const int64_t id = omp_get_thread_num();
  if (threads == 1) return {g.chunk_begin, g.chunk_end};
  return {split_point(tab, g, work * id / threads), split_point(tab, g, work * (id + 1) / threads)};
}

inline int64_t group_work(const CpuTable& tab, const Group& g) {
  int64_t work = 0;
  for (int64_t layer = g.layer_begin; layer < g.layer_end; ++layer) {
    work += tab.row(layer)[COL_NUMEL] + kChunkCost * tab.row(layer)[COL_NUM_CHUNKS];
  }
  return work;
}

// The per-layer step of both optimizers: the layer's two sums of squares from its chunks' partials, added in
// chunk order (PHASE_APPLY: the given whole-layer sums instead). PHASE_SUMS stores them and stops; otherwise
// the step count advances once and the layer's results are ratio(first, second, t, flags) and t.
template <typename Ratio>
inline void finish_layer(const CpuTable& tab, int64_t layer, Ratio ratio) {
  const int64_t* row = tab.row(layer);
  double first = 0.0, second = 0.0;
  if (tab.phase == PHASE_APPLY) {
    first = tab.layer_sums[2 * layer];
    second = tab.layer_sums[2 * layer + 1];
  } else {
    for (int64_t c = row[COL_FIRST_CHUNK]; c < row[COL_FIRST_CHUNK] + row[COL_NUM_CHUNKS]; ++c) {
      first += tab.chunk_partials[2 * c];
      second += tab.chunk_partials[2 * c + 1];
    }
  }
  if (tab.phase == PHASE_SUMS) {
    tab.layer_sums[2 * layer] = first;
    tab.layer_sums[2 * layer + 1] = second;
    return;
  }
  float* step = column_ptr<float>(row, COL_STEP);
  const float t = *step + 1.0f;
  *step = t;
  tab.layer_results[2 * layer] = ratio(first, second, t, row[COL_FLAGS]);
  tab.layer_results[2 * layer + 1] = t;
}

// One step over the bucket, group by group, in the calling OpenMP team: sums(c) is chunk c's pass 1,
// ratio the per-layer trust ratio (finish_layer), apply(c) chunk c's pass 2. Every thread walks the same
// groups, so the barriers match.
template <typename BytesOf, typename Sums, typename Ratio, typename Apply>
inline void step_groups(const CpuTable& tab, BytesOf bytes_of, Sums sums, Ratio ratio, Apply apply) {
  const int64_t budget = kGroupBytesPerThread * omp_get_num_threads();
  for (int64_t layer = 0; layer < tab.num_layers;) {
    const Group g = next_group(tab, layer, budget, bytes_of);
    const ElementRange mine = thread_share(tab, g, group_work(tab, g));
    if (tab.phase != PHASE_APPLY) {  // the same branch in every thread, so the barrier inside is valid
      for (int64_t c = mine.begin; c < mine.end; ++c) sums(c);
#pragma omp barrier
    }
#pragma omp for schedule(static)
    for (int64_t l = g.layer_begin; l < g.layer_end; ++l) finish_layer(tab, l, ratio);  // implicit barrier
    if (tab.phase != PHASE_SUMS) {
      for (int64_t c = mine.end - 1; c >= mine.begin; --c) apply(c);
    }
    layer = g.layer_end;  // the next group's chunks are other chunks: no barrier needed before its pass 1
  }
}

// The team size: one thread for small buckets, at most at::get_num_threads().
inline int team_size(const CpuTable& tab) {
  int64_t elements = 0;
  for (int64_t layer = 0; layer < tab.num_layers; ++layer) elements += tab.row(layer)[COL_NUMEL];
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, at::get_num_threads()));
}

// A layer's weights as the step reads and writes them (WeightSource, step_inputs.h): the parameter, its float32
// master, or a bfloat16 parameter and its bfloat16 Kahan compensation (raw bits). The element helpers below are
// always inlined: a call left in an element loop stops it from vectorising.
//
// The float32 weight the step reads: the master, param + comp (exact, docs/algorithms.md section 9), or the param.
template <typename scalar_t, int kSource>
TVLARS_ALWAYS_INLINE inline float load_weight(const scalar_t* __restrict__ param, const float* __restrict__ master,
                                              const uint16_t* __restrict__ comp, int64_t i) {
  if constexpr (kSource == kMasterWeights) {
    return master[i];
  } else if constexpr (kSource == kKahanWeights) {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>, "Kahan compensation is for bfloat16 params");
    return bf16_bits_to_float(param[i].x) + bf16_bits_to_float(comp[i]);
  } else {
    return static_cast<float>(param[i]);
  }
}

// Stores the new weight: into the master copy when there is one and (rounded once) into the parameter; with a
// Kahan compensation, as the parameter's nearest bfloat16 and the nearest bfloat16 of the rest.
template <typename scalar_t, int kSource>
TVLARS_ALWAYS_INLINE inline void store_weight(scalar_t* __restrict__ param, float* __restrict__ master,
                                              uint16_t* __restrict__ comp, int64_t i, float w) {
  if constexpr (kSource == kKahanWeights) {
    const KahanSplit split = kahan_split(w);
    param[i].x = split.param;
    comp[i] = split.comp;
  } else {
    if constexpr (kSource == kMasterWeights) master[i] = w;
    param[i] = static_cast<scalar_t>(w);
  }
}

// Bytes of weight a pass reads per element.
template <typename scalar_t, int kSource>
constexpr int64_t kWeightBytes = kSource == kMasterWeights ? 4 : kSource == kKahanWeights ? 4 : sizeof(scalar_t);

// State elements: float32, or bfloat16 as raw bits (kBf16State), loaded as float32.
template <bool kBf16State>
using state_t = std::conditional_t<kBf16State, uint16_t, float>;

TVLARS_ALWAYS_INLINE inline float load_state(const float* __restrict__ s, int64_t i) {
  return s[i];
}

TVLARS_ALWAYS_INLINE inline float load_state(const uint16_t* __restrict__ s, int64_t i) {
  return bf16_bits_to_float(s[i]);
}

// Stores a state element and returns what was stored, which the step continues with: x itself in float32; in
// bfloat16, x rounded stochastically from the stream (`base`, element index offset + i) or to nearest.
// How this step stores one chunk's bfloat16 state: the layer's StateRounding (its streams' bases for the new step
// count), and where the chunk lies in the stream in 32-bit words (rounding_bits_after): element i draws the bits of
// the index offset + i from the low word of offset + begin plus (i - begin), i - begin below the chunk size.
struct ChunkRounding {
  bool stochastic;
  uint32_t base0;
  uint32_t base1;
  uint32_t begin;     // the chunk's first local index, low word
  uint32_t lo0;       // low word of that element's index in the whole layer
  uint32_t hi0_term;  // its high word times the hash's multiplier
};

inline ChunkRounding chunk_rounding(const int64_t* row, ElementRange r, bool stochastic, uint32_t seed, float t) {
  const StateRounding layer = state_rounding(stochastic, seed, row[COL_LAYER_ID], row[COL_ELEMENT_OFFSET], t);
  const uint64_t first = static_cast<uint64_t>(layer.offset + r.begin);
  return {stochastic, layer.base0, layer.base1, static_cast<uint32_t>(r.begin), static_cast<uint32_t>(first),
          static_cast<uint32_t>(first >> 32) * 0x9E3779B9u};
}

TVLARS_ALWAYS_INLINE inline float store_state(float* __restrict__ s, int64_t i, float x, const ChunkRounding&,
                                              uint32_t) {
  s[i] = x;
  return x;
}

TVLARS_ALWAYS_INLINE inline float store_state(uint16_t* __restrict__ s, int64_t i, float x, const ChunkRounding& r,
                                              uint32_t base) {
  const uint32_t d = static_cast<uint32_t>(i) - r.begin;
  const uint32_t stored = bf16_round_for_store(x, r.stochastic, rounding_bits_after(base, r.lo0, r.hi0_term, d));
  s[i] = static_cast<uint16_t>(stored >> 16);
  return float_from_bits(stored);
}

// ---------------------------------------------------------------- LARS family

template <typename scalar_t, int kSource, bool kScaled>
TVLARS_CPU_CLONES void lars_chunk_partials(const int64_t* row, ElementRange r, float grad_scale, const LarsHyper h,
                                           double* out) {
  const scalar_t* __restrict__ param = column_ptr<const scalar_t>(row, COL_PARAM);
  const float* __restrict__ master = column_ptr<const float>(row, COL_MASTER);
  const uint16_t* __restrict__ comp = column_ptr<const uint16_t>(row, COL_COMP);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  const bool no_decay = row[COL_FLAGS] & FLAG_NO_DECAY;
  double w_sq[kLanes] = {};
  double denom_sq[kLanes] = {};
  auto accumulate = [&](int64_t i, int j) {
    const float wi = load_weight<scalar_t, kSource>(param, master, comp, i);
    const float gi = step_grad<kScaled>(static_cast<float>(g[i]), grad_scale, 1.0f);
    const float term = lars_denominator_term(gi, lars_decayed_grad(gi, wi, h.weight_decay, no_decay), h.sum_of_norms);
    w_sq[j] += square(wi);
    denom_sq[j] += square(term);
  };
  int64_t i = r.begin;
  for (; i + kLanes <= r.end; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) accumulate(i + j, j);
  }
  for (int j = 0; i + j < r.end; ++j) accumulate(i + j, j);
  out[0] = ordered_sum(w_sq);
  out[1] = ordered_sum(denom_sq);
}

// Calls fn(std::bool_constant<a>{}, std::bool_constant<b>{}, std::bool_constant<c>{}): a loop over elements that
// selects on run-time flags by `?:` vectorises only once GCC unswitches it on them (as a select, its arithmetic
// could trap), and GCC stops unswitching a loop as large as one that rounds bfloat16 state or splits a Kahan pair.
// So such loops are unswitched here, one copy per combination, inlined into the caller's target clone.
template <typename Fn>
TVLARS_ALWAYS_INLINE inline void with_flags(bool a, bool b, bool c, Fn&& fn) {
  auto third = [&](auto ka, auto kb) TVLARS_ALWAYS_INLINE {
    if (c) {
      fn(ka, kb, std::true_type{});
    } else {
      fn(ka, kb, std::false_type{});
    }
  };
  auto second = [&](auto ka) TVLARS_ALWAYS_INLINE {
    if (b) {
      third(ka, std::true_type{});
    } else {
      third(ka, std::false_type{});
    }
  };
  if (a) {
    second(std::true_type{});
  } else {
    second(std::false_type{});
  }
}

// The buffer is stored first (rounded, for bfloat16 state) and the weight's update uses the stored buffer.
template <typename scalar_t, int kSource, bool kBf16State, bool kScaled>
TVLARS_CPU_CLONES void lars_chunk_apply(const int64_t* row, ElementRange r, float grad_scale, float lr, float q,
                                        bool first, const ChunkRounding rounding, const LarsHyper h) {
  scalar_t* __restrict__ param = column_ptr<scalar_t>(row, COL_PARAM);
  float* __restrict__ master = column_ptr<float>(row, COL_MASTER);
  uint16_t* __restrict__ comp = column_ptr<uint16_t>(row, COL_COMP);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  state_t<kBf16State>* __restrict__ buf = column_ptr<state_t<kBf16State>>(row, COL_STATE0);
  const bool no_decay = row[COL_FLAGS] & FLAG_NO_DECAY;
  with_flags(first, no_decay, h.nesterov, [&](auto first_k, auto no_decay_k, auto nesterov_k) TVLARS_ALWAYS_INLINE {
#pragma omp simd
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float w = load_weight<scalar_t, kSource>(param, master, comp, i);
      const float d = lars_decayed_grad(step_grad<kScaled>(static_cast<float>(g[i]), grad_scale, 1.0f), w,
                                        h.weight_decay, no_decay_k);
      const float u = q * d;
      const float b = store_state(buf, i, lars_momentum(h, u, first_k, load_state(buf, i)), rounding, rounding.base0);
      store_weight<scalar_t, kSource>(param, master, comp, i, lars_new_weight(h, nesterov_k, lr, u, b, w));
    }
  });
}

template <typename scalar_t, int kSource, bool kBf16State, bool kScaled>
void lars_cpu(const CpuTable& tab, const LarsHyper& h, float grad_scale, float lr) {
  // Pass 1 reads the weight and the gradient; layers without a trust ratio skip it.
  auto bytes_of = [&](const int64_t* row) -> int64_t {
    return layer_adapted(h.adapt, row[COL_FLAGS])
               ? row[COL_NUMEL] * (kWeightBytes<scalar_t, kSource> + int64_t{sizeof(scalar_t)})
               : 0;
  };
  auto sums = [&](int64_t c) {
    const int64_t* row = tab.row_of_chunk(c);
    double* out = tab.chunk_partials + 2 * c;
    if (!layer_adapted(h.adapt, row[COL_FLAGS])) {
      out[0] = out[1] = 0.0;
      return;
    }
    lars_chunk_partials<scalar_t, kSource, kScaled>(row, chunk_elements(row, c, tab.chunk_size), grad_scale, h, out);
  };
  auto ratio = [&](double w_sq, double denom_sq, float t, int64_t flags) {
    return lars_trust_ratio(h, w_sq, denom_sq, t, lr, layer_decay(h.weight_decay, flags),
                            layer_adapted(h.adapt, flags));
  };
  auto apply = [&](int64_t c) {
    const int64_t layer = tab.chunk_layer[c];
    const int64_t* row = tab.row(layer);
    const float t = static_cast<float>(tab.layer_results[2 * layer + 1]);  // the new step count
    const ElementRange r = chunk_elements(row, c, tab.chunk_size);
    lars_chunk_apply<scalar_t, kSource, kBf16State, kScaled>(
        row, r, grad_scale, lr, static_cast<float>(tab.layer_results[2 * layer]), t == 1.0f,
        chunk_rounding(row, r, h.stochastic_rounding, h.seed, t), h);
  };
#pragma omp parallel num_threads(team_size(tab))
  step_groups(tab, bytes_of, sums, ratio, apply);
}

// ---------------------------------------------------------------- LAMB

struct BiasCorrections {
  float first;
  float second;
};

inline BiasCorrections bias_corrections(const LambHyper& h, float t) {
  if (!h.bias_correction) return {1.0f, 1.0f};
  return {bias_correction(t, h.log_beta1), bias_correction(t, h.log_beta2)};
}

// Updates and stores the moments of one chunk (rounded, for bfloat16 state), and sums w^2 and u^2 over it, u formed
// from the stored moments.
template <typename scalar_t, int kSource, bool kBf16State, bool kScaled>
TVLARS_CPU_CLONES void lamb_chunk_moments(const int64_t* row, ElementRange r, float grad_scale, float grad_mult,
                                          BiasCorrections bc, const ChunkRounding rounding, const LambHyper h,
                                          double* out) {
  const scalar_t* __restrict__ param = column_ptr<const scalar_t>(row, COL_PARAM);
  const float* __restrict__ master = column_ptr<const float>(row, COL_MASTER);
  const uint16_t* __restrict__ comp = column_ptr<const uint16_t>(row, COL_COMP);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  state_t<kBf16State>* __restrict__ m = column_ptr<state_t<kBf16State>>(row, COL_STATE0);
  state_t<kBf16State>* __restrict__ v = column_ptr<state_t<kBf16State>>(row, COL_STATE1);
  const float decay = lamb_update_decay(h, layer_decay(h.weight_decay, row[COL_FLAGS]));
  double w_sq[kLanes] = {};
  double u_sq[kLanes] = {};
  auto accumulate = [&](int64_t i, int j) {
    const float wi = load_weight<scalar_t, kSource>(param, master, comp, i);
    float mi = load_state(m, i), vi = load_state(v, i);
    lamb_moments(h, step_grad<kScaled>(static_cast<float>(g[i]), grad_scale, grad_mult), mi, vi);
    mi = store_state(m, i, mi, rounding, rounding.base0);
    vi = store_state(v, i, vi, rounding, rounding.base1);
    const float u = lamb_update(mi, vi, wi, bc.first, bc.second, h.eps, decay);
    w_sq[j] += square(wi);
    u_sq[j] += square(u);
  };
  int64_t i = r.begin;
  for (; i + kLanes <= r.end; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) accumulate(i + j, j);
  }
  for (int j = 0; i + j < r.end; ++j) accumulate(i + j, j);
  out[0] = ordered_sum(w_sq);
  out[1] = ordered_sum(u_sq);
}

// Recomputes u from the stored moments (bit-identical to pass 1's) and applies w = keep*w - lr*q*u (keep: the
// decoupled decay's 1 - lr*beta', else 1).
template <typename scalar_t, int kSource, bool kBf16State>
TVLARS_CPU_CLONES void lamb_chunk_apply(const int64_t* row, ElementRange r, BiasCorrections bc, float lr_q,
                                        float keep, const LambHyper h) {
  scalar_t* __restrict__ param = column_ptr<scalar_t>(row, COL_PARAM);
  float* __restrict__ master = column_ptr<float>(row, COL_MASTER);
  uint16_t* __restrict__ comp = column_ptr<uint16_t>(row, COL_COMP);
  const state_t<kBf16State>* __restrict__ m = column_ptr<const state_t<kBf16State>>(row, COL_STATE0);
  const state_t<kBf16State>* __restrict__ v = column_ptr<const state_t<kBf16State>>(row, COL_STATE1);
  const float decay = lamb_update_decay(h, layer_decay(h.weight_decay, row[COL_FLAGS]));
#pragma omp simd
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float w = load_weight<scalar_t, kSource>(param, master, comp, i);
    const float u = lamb_update(load_state(m, i), load_state(v, i), w, bc.first, bc.second, h.eps, decay);
    store_weight<scalar_t, kSource>(param, master, comp, i, lamb_apply(keep, w, lr_q, u));
  }
}

template <typename scalar_t, int kSource, bool kBf16State, bool kScaled>
void lamb_cpu(const CpuTable& tab, const LambHyper& h, float grad_scale, float grad_mult, float lr) {
  // Pass 1 reads the weight, the gradient and both moments.
  auto bytes_of = [](const int64_t* row) -> int64_t {
    return row[COL_NUMEL] * (kWeightBytes<scalar_t, kSource> + int64_t{sizeof(scalar_t)} +
                             2 * int64_t{sizeof(state_t<kBf16State>)});
  };
  auto sums = [&](int64_t c) {
    const int64_t* row = tab.row_of_chunk(c);
    const float t = *column_ptr<const float>(row, COL_STEP) + 1.0f;  // written back only after the barrier
    const ElementRange r = chunk_elements(row, c, tab.chunk_size);
    lamb_chunk_moments<scalar_t, kSource, kBf16State, kScaled>(row, r, grad_scale, grad_mult, bias_corrections(h, t),
                                                               chunk_rounding(row, r, h.stochastic_rounding, h.seed, t),
                                                               h, tab.chunk_partials + 2 * c);
  };
  auto ratio = [&](double w_sq, double u_sq, float, int64_t flags) {
    return lamb_trust_ratio(h, w_sq, u_sq, lr, layer_decay(h.weight_decay, flags), layer_adapted(h.adapt, flags));
  };
  auto apply = [&](int64_t c) {
    const int64_t layer = tab.chunk_layer[c];
    const int64_t* row = tab.row(layer);
    const float lr_q = lr * static_cast<float>(tab.layer_results[2 * layer]);
    const BiasCorrections bc = bias_corrections(h, static_cast<float>(tab.layer_results[2 * layer + 1]));
    const float keep = lamb_weight_keep(h, lr, layer_decay(h.weight_decay, row[COL_FLAGS]));
    lamb_chunk_apply<scalar_t, kSource, kBf16State>(row, chunk_elements(row, c, tab.chunk_size), bc, lr_q, keep, h);
  };
#pragma omp parallel num_threads(team_size(tab))
  step_groups(tab, bytes_of, sums, ratio, apply);
}

// ---------------------------------------------------------------- entry points

inline float scalar_or(const float* t, float otherwise) {
  return t != nullptr ? *t : otherwise;
}

CpuTable cpu_table(const StepArgs& a) {
  return {a.rows_host.data_ptr<int64_t>(), a.chunk_layer.data_ptr<int32_t>(), a.num_layers, a.num_chunks,
          a.chunk_size, a.chunk_partials, a.layer_results, a.phase, a.layer_sums};
}

}  // namespace

void lars_run_cpu(const StepArgs& a, const LarsHyper& h) {
  if (scalar_or(a.found_inf, 0.0f) != 0.0f) return;  // GradScaler found inf/NaN: the step writes nothing
  const CpuTable tab = cpu_table(a);
  const float scale = scalar_or(a.grad_scale, 1.0f);
  const float lr_now = scalar_or(a.lr, h.lr);
  dispatch_step(a, [&](auto scalar, auto source, auto bf16_state) {
    using scalar_t = decltype(scalar);
    constexpr int kSource = decltype(source)::value;
    constexpr bool kBf16State = decltype(bf16_state)::value;
    scale != 1.0f ? lars_cpu<scalar_t, kSource, kBf16State, true>(tab, h, scale, lr_now)
                  : lars_cpu<scalar_t, kSource, kBf16State, false>(tab, h, scale, lr_now);
  });
}

void lamb_run_cpu(const StepArgs& a, const LambHyper& h) {
  if (scalar_or(a.found_inf, 0.0f) != 0.0f) return;  // GradScaler found inf/NaN: the step writes nothing
  const CpuTable tab = cpu_table(a);
  const float scale = scalar_or(a.grad_scale, 1.0f);
  const float mult = scalar_or(a.clip_coef, 1.0f);
  const float lr_now = scalar_or(a.lr, h.lr);
  dispatch_step(a, [&](auto scalar, auto source, auto bf16_state) {
    using scalar_t = decltype(scalar);
    constexpr int kSource = decltype(source)::value;
    constexpr bool kBf16State = decltype(bf16_state)::value;
    scale != 1.0f || mult != 1.0f ? lamb_cpu<scalar_t, kSource, kBf16State, true>(tab, h, scale, mult, lr_now)
                                  : lamb_cpu<scalar_t, kSource, kBf16State, false>(tab, h, scale, mult, lr_now);
  });
}

void lars_step_cpu(TVLARS_LARS_STEP_ARGS) {
  lars_run_cpu(TVLARS_LARS_LIST_CHECKED("lars_step"), TVLARS_LARS_HYPER("lars_step"));
}

void lamb_step_cpu(TVLARS_LAMB_STEP_ARGS) {
  lamb_run_cpu(TVLARS_LAMB_LIST_CHECKED("lamb_step"), TVLARS_LAMB_HYPER("lamb_step"));
}

void lars_step_table_cpu(TVLARS_LARS_TABLE_ARGS) {
  lars_run_cpu(TVLARS_LARS_TABLE_CHECKED("lars_step_table"), TVLARS_LARS_HYPER("lars_step_table"));
}

void lamb_step_table_cpu(TVLARS_LAMB_TABLE_ARGS) {
  lamb_run_cpu(TVLARS_LAMB_TABLE_CHECKED("lamb_step_table"), TVLARS_LAMB_HYPER("lamb_step_table"));
}

}  // namespace tvlars
