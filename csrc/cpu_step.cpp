// The CPU twin of the CUDA kernel: same layer table, same math header, same phases.
//
// Pass 1 writes per-chunk partial sums of squares to the workspace (LAMB also updates the moments here);
// the per-layer step reduces each layer's partials in chunk order (no atomics, so two runs are
// bit-identical whatever the thread count), advances the step count once and computes the trust ratio;
// pass 2 applies the update. A split step (StepPhase) runs pass 1 and the reduction only, storing the sums,
// or takes the sums as given and runs the per-layer step and pass 2 only. Chunks are split into one
// contiguous block per OpenMP thread and pass 2 walks each block backwards, so a thread starts on the chunks
// it read last (still in its cache).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include "layer_table.h"
#include "optimizer_math.h"
#include "step_inputs.h"
#include "step_ops.h"

namespace tvlars {
namespace {

// The chunk functions take the hyper-parameters by value: a local copy cannot alias the float32 state they
// store to.
//
// Sums of squares go to kLanes independent accumulators (lane j takes elements begin + j, begin + j + kLanes,
// ...), summed in lane order at the end: the order depends neither on the thread count nor on addresses, and
// `omp simd` on the lane loop vectorises it without -ffast-math.
constexpr int kLanes = 16;

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
};

// The per-layer step of both optimizers: the layer's two sums of squares from its chunks' partials, added in
// chunk order (PHASE_APPLY: the given whole-layer sums instead). PHASE_SUMS stores them and stops; otherwise
// the step count advances once and the layer's results are ratio(first, second, t, excluded) and t.
template <typename Ratio>
inline void finish_layer(const CpuTable& tab, int64_t layer, Ratio ratio) {
  const int64_t* row = tab.rows + layer * NUM_COLS;
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
  tab.layer_results[2 * layer] = ratio(first, second, t, (row[COL_FLAGS] & FLAG_EXCLUDED) != 0);
  tab.layer_results[2 * layer + 1] = t;
}

// This thread's contiguous block of [0, n).
inline ElementRange thread_block(int64_t n) {
  const int64_t threads = omp_get_num_threads();
  const int64_t id = omp_get_thread_num();
  return {n * id / threads, n * (id + 1) / threads};
}

template <typename weight_t>
inline const weight_t* weights_of(const int64_t* row) {
  return column_ptr<const weight_t>(row, row[COL_MASTER] != 0 ? COL_MASTER : COL_PARAM);
}

// Stores the new weight: into the master copy when there is one, and (rounded once) into the parameter.
template <typename scalar_t, bool kHasMaster>
inline void store_weight(scalar_t* __restrict__ param, float* __restrict__ master, int64_t i, float w) {
  if (kHasMaster) master[i] = w;
  param[i] = static_cast<scalar_t>(w);
}

// ---------------------------------------------------------------- LARS family

template <typename scalar_t, typename weight_t>
void lars_chunk_partials(const int64_t* row, ElementRange r, float grad_scale, const LarsHyper h, double* out) {
  const weight_t* __restrict__ w = weights_of<weight_t>(row);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  double w_sq[kLanes] = {};
  double denom_sq[kLanes] = {};
  auto accumulate = [&](int64_t i, int j) {
    const float wi = static_cast<float>(w[i]);
    const float gi = effective_grad(static_cast<float>(g[i]), grad_scale, 1.0f);
    const float term = lars_denominator_term(gi, lars_decayed_grad(gi, wi, h.weight_decay, false), h.sum_of_norms);
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

template <typename scalar_t, bool kHasMaster>
void lars_chunk_apply(const int64_t* row, ElementRange r, float grad_scale, float lr, float q, const LarsHyper h) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
  scalar_t* __restrict__ param = column_ptr<scalar_t>(row, COL_PARAM);
  float* __restrict__ master = column_ptr<float>(row, COL_MASTER);
  const weight_t* __restrict__ w_in = weights_of<weight_t>(row);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  float* __restrict__ buf = column_ptr<float>(row, COL_STATE0);
  const bool excluded = row[COL_FLAGS] & FLAG_EXCLUDED;
#pragma omp simd
  for (int64_t i = r.begin; i < r.end; ++i) {
    float w = static_cast<float>(w_in[i]);
    const float d = lars_decayed_grad(effective_grad(static_cast<float>(g[i]), grad_scale, 1.0f), w,
                                      h.weight_decay, excluded);
    float b = buf[i];
    lars_apply(h, lr, q, d, w, b);
    buf[i] = b;
    store_weight<scalar_t, kHasMaster>(param, master, i, w);
  }
}

template <typename scalar_t, bool kHasMaster>
void lars_cpu(const CpuTable& tab, const LarsHyper& h, float grad_scale, float lr) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const ElementRange mine = thread_block(tab.num_chunks);
    if (tab.phase != PHASE_APPLY) {  // the same branch in every thread, so the barrier inside is valid
      for (int64_t c = mine.begin; c < mine.end; ++c) {
        const int64_t* row = tab.rows + static_cast<int64_t>(tab.chunk_layer[c]) * NUM_COLS;
        double* out = tab.chunk_partials + 2 * c;
        if (row[COL_FLAGS] & FLAG_EXCLUDED) {  // no trust ratio: nothing to sum
          out[0] = out[1] = 0.0;
          continue;
        }
        lars_chunk_partials<scalar_t, weight_t>(row, chunk_elements(row, c, tab.chunk_size), grad_scale, h, out);
      }
#pragma omp barrier
    }
#pragma omp for schedule(static)
    for (int64_t layer = 0; layer < tab.num_layers; ++layer) {
      finish_layer(tab, layer, [&](double w_sq, double denom_sq, float t, bool excluded) {
        return lars_trust_ratio(h, w_sq, denom_sq, t, excluded);
      });
    }  // implicit barrier
    if (tab.phase != PHASE_SUMS) {
      for (int64_t c = mine.end - 1; c >= mine.begin; --c) {
        const int64_t layer = tab.chunk_layer[c];
        const int64_t* row = tab.rows + layer * NUM_COLS;
        lars_chunk_apply<scalar_t, kHasMaster>(row, chunk_elements(row, c, tab.chunk_size), grad_scale, lr,
                                               static_cast<float>(tab.layer_results[2 * layer]), h);
      }
    }
  }
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

// Updates the moments of one chunk and sums w^2 and u^2 over it.
template <typename scalar_t, typename weight_t>
void lamb_chunk_moments(const int64_t* row, ElementRange r, float grad_scale, float grad_mult, BiasCorrections bc,
                        const LambHyper h, double* out) {
  const weight_t* __restrict__ w = weights_of<weight_t>(row);
  const scalar_t* __restrict__ g = column_ptr<const scalar_t>(row, COL_GRAD);
  float* __restrict__ m = column_ptr<float>(row, COL_STATE0);
  float* __restrict__ v = column_ptr<float>(row, COL_STATE1);
  const float decay = lamb_decay(h, row[COL_FLAGS] & FLAG_EXCLUDED);
  double w_sq[kLanes] = {};
  double u_sq[kLanes] = {};
  auto accumulate = [&](int64_t i, int j) {
    const float wi = static_cast<float>(w[i]);
    float mi = m[i], vi = v[i];
    lamb_moments(h, effective_grad(static_cast<float>(g[i]), grad_scale, grad_mult), mi, vi);
    m[i] = mi;
    v[i] = vi;
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

// Recomputes u from the stored moments (bit-identical to pass 1's) and applies w -= lr*q*u.
template <typename scalar_t, bool kHasMaster>
void lamb_chunk_apply(const int64_t* row, ElementRange r, BiasCorrections bc, float lr_q, const LambHyper h) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
  scalar_t* __restrict__ param = column_ptr<scalar_t>(row, COL_PARAM);
  float* __restrict__ master = column_ptr<float>(row, COL_MASTER);
  const weight_t* __restrict__ w_in = weights_of<weight_t>(row);
  const float* __restrict__ m = column_ptr<const float>(row, COL_STATE0);
  const float* __restrict__ v = column_ptr<const float>(row, COL_STATE1);
  const float decay = lamb_decay(h, row[COL_FLAGS] & FLAG_EXCLUDED);
#pragma omp simd
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float w = static_cast<float>(w_in[i]);
    const float u = lamb_update(m[i], v[i], w, bc.first, bc.second, h.eps, decay);
    store_weight<scalar_t, kHasMaster>(param, master, i, w - lr_q * u);
  }
}

template <typename scalar_t, bool kHasMaster>
void lamb_cpu(const CpuTable& tab, const LambHyper& h, float grad_scale, float grad_mult, float lr) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const ElementRange mine = thread_block(tab.num_chunks);
    if (tab.phase != PHASE_APPLY) {  // the same branch in every thread, so the barrier inside is valid
      for (int64_t c = mine.begin; c < mine.end; ++c) {
        const int64_t* row = tab.rows + static_cast<int64_t>(tab.chunk_layer[c]) * NUM_COLS;
        const float t = *column_ptr<const float>(row, COL_STEP) + 1.0f;  // written back only after the barrier
        lamb_chunk_moments<scalar_t, weight_t>(row, chunk_elements(row, c, tab.chunk_size), grad_scale,
                                               grad_mult, bias_corrections(h, t), h, tab.chunk_partials + 2 * c);
      }
#pragma omp barrier
    }
#pragma omp for schedule(static)
    for (int64_t layer = 0; layer < tab.num_layers; ++layer) {
      finish_layer(tab, layer, [&](double w_sq, double u_sq, float, bool excluded) {
        return lamb_trust_ratio(h, w_sq, u_sq, excluded);
      });
    }  // implicit barrier
    if (tab.phase != PHASE_SUMS) {
      for (int64_t c = mine.end - 1; c >= mine.begin; --c) {
        const int64_t layer = tab.chunk_layer[c];
        const int64_t* row = tab.rows + layer * NUM_COLS;
        const float lr_q = lr * static_cast<float>(tab.layer_results[2 * layer]);
        lamb_chunk_apply<scalar_t, kHasMaster>(row, chunk_elements(row, c, tab.chunk_size),
                                               bias_corrections(h, static_cast<float>(tab.layer_results[2 * layer + 1])),
                                               lr_q, h);
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch

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
  dispatch_dtype(a.dtype, a.has_master, [&](auto scalar, auto has_master) {
    lars_cpu<decltype(scalar), decltype(has_master)::value>(tab, h, scale, lr_now);
  });
}

void lamb_run_cpu(const StepArgs& a, const LambHyper& h) {
  if (scalar_or(a.found_inf, 0.0f) != 0.0f) return;  // GradScaler found inf/NaN: the step writes nothing
  const CpuTable tab = cpu_table(a);
  const float scale = scalar_or(a.grad_scale, 1.0f);
  const float mult = scalar_or(a.clip_coef, 1.0f);
  const float lr_now = scalar_or(a.lr, h.lr);
  dispatch_dtype(a.dtype, a.has_master, [&](auto scalar, auto has_master) {
    lamb_cpu<decltype(scalar), decltype(has_master)::value>(tab, h, scale, mult, lr_now);
  });
}

void lars_step_cpu(TVLARS_LARS_STEP_ARGS) {
  lars_run_cpu(TVLARS_LARS_LIST_CHECKED("lars_step"), TVLARS_LARS_HYPER);
}

void lamb_step_cpu(TVLARS_LAMB_STEP_ARGS) {
  lamb_run_cpu(TVLARS_LAMB_LIST_CHECKED("lamb_step"), TVLARS_LAMB_HYPER("lamb_step"));
}

void lars_step_table_cpu(TVLARS_LARS_TABLE_ARGS) {
  lars_run_cpu(TVLARS_LARS_TABLE_CHECKED("lars_step_table"), TVLARS_LARS_HYPER);
}

void lamb_step_table_cpu(TVLARS_LAMB_TABLE_ARGS) {
  lamb_run_cpu(TVLARS_LAMB_TABLE_CHECKED("lamb_step_table"), TVLARS_LAMB_HYPER("lamb_step_table"));
}

}  // namespace tvlars
