// The CUDA implementation of the tvlars_fused ops: one persistent cooperative kernel launch per step.
//
// The grid is at most as large as the number of blocks that can be co-resident, so cooperative_groups'
// grid.sync() is a valid barrier between three phases:
//   1. blocks stride over the chunks and write each chunk's partial sums of squares to the workspace;
//   2. one warp per layer reduces that layer's partials in chunk order (lane-strided, then a fixed shuffle
//      tree: no atomics, so results are bit-reproducible), advances the step count once and writes the
//      trust ratio (and the new step count) to the workspace;
//   3. blocks stride over the chunks again and apply the update.
// LAMB orders its data dependency the same way: phase 1 updates and stores the moments m, v and sums w^2 and
// u^2 (u from the fresh moments); phase 2 turns the layer's sums into q = ||w|| / ||u||; phase 3 reads m, v
// and w again, recomputes u (bit-identical: same float32 inputs, same code) and writes w - lr*q*u. Gradients
// are only read, never overwritten. With found_inf set every block returns before the first barrier, so
// nothing at all is written. A split step (StepPhase, for sharded layers) runs phases 1 and 2 only, phase 2
// storing the layer's sums instead of using them, or takes the sums as given and runs phases 2 and 3 only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "build_marker.h"
#include "layer_table.h"
#include "optimizer_math.h"
#include "step_inputs.h"
#include "step_ops.h"

namespace cg = cooperative_groups;

namespace tvlars {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPack = 4;  // consecutive elements per thread per iteration (one 16-byte float32 load)

struct DeviceTable {
  const int64_t* rows;
  const int32_t* chunk_layer;
  int64_t num_layers;
  int64_t num_chunks;
  int64_t chunk_size;
  float* chunk_partials;  // [num_chunks][2]
  float* layer_results;   // [num_layers][2]: trust ratio, new step count
  int64_t phase;          // StepPhase
  float* layer_sums;      // [num_layers][2]: written by PHASE_SUMS, read by PHASE_APPLY; else nullptr
};

// Optional device scalars, read in-kernel so that a captured CUDA graph replays with their current values.
struct DeviceScalars {
  const float* lr;          // nullptr: use the hyper-parameter's lr
  const float* grad_scale;  // nullptr: 1
  const float* found_inf;   // nullptr: 0
  const float* clip_coef;   // nullptr: 1 (LAMB only)
};

template <typename T>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

// Pack-wide loads need every tensor of the layer 16-byte aligned; chunk starts are multiples of 4 elements.
__device__ __forceinline__ bool packable(const int64_t* row) {
  const int64_t bits = row[COL_PARAM] | row[COL_GRAD] | row[COL_STATE0] | row[COL_STATE1] | row[COL_MASTER];
  return (bits & 15) == 0;
}

// Loads elements i .. i+kPack-1 (zeros past end) as float32.
template <typename T>
__device__ __forceinline__ void load_pack(const T* base, int64_t i, int64_t end, bool vec, float (&out)[kPack]) {
  if (vec && i + kPack <= end) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(base + i);
#pragma unroll
    for (int j = 0; j < kPack; ++j) out[j] = static_cast<float>(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kPack; ++j) out[j] = i + j < end ? static_cast<float>(base[i + j]) : 0.0f;
  }
}

// Stores elements i .. min(i+kPack, end)-1, rounding once to T.
template <typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t i, int64_t end, bool vec, const float (&in)[kPack]) {
  if (vec && i + kPack <= end) {
    Pack<T> pack;
#pragma unroll
    for (int j = 0; j < kPack; ++j) pack.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T>*>(base + i) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      if (i + j < end) base[i + j] = static_cast<T>(in[j]);
    }
  }
}

template <typename weight_t>
__device__ __forceinline__ const weight_t* weights_of(const int64_t* row) {
  return column_ptr<const weight_t>(row, row[COL_MASTER] != 0 ? COL_MASTER : COL_PARAM);
}

// The new weights go to the master copy when there is one, and (rounded once) to the parameter.
template <typename scalar_t, bool kHasMaster>
__device__ __forceinline__ void store_weights(const int64_t* row, int64_t i, int64_t end, bool vec,
                                              const float (&w)[kPack]) {
  if (kHasMaster) store_pack(column_ptr<float>(row, COL_MASTER), i, end, vec, w);
  store_pack(column_ptr<scalar_t>(row, COL_PARAM), i, end, vec, w);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the block in a fixed order; thread 0 holds the totals.
__device__ __forceinline__ void block_sum2(float& a, float& b, float (&scratch)[2][kWarps]) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    scratch[0][warp] = a;
    scratch[1][warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0f;
    b = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      a += scratch[0][w];
      b += scratch[1][w];
    }
  }
  __syncthreads();  // scratch is reused by the block's next chunk
}

// Phase 2 for both optimizers: one warp per layer sums the layer's chunk partials in a fixed order (PHASE_APPLY:
// takes the given whole-layer sums instead), then lane 0 stores the sums (PHASE_SUMS) or advances the step
// count (its only write) and stores ratio(first, second, t) and t.
template <typename Ratio>
__device__ __forceinline__ void reduce_layers(const DeviceTable& tab, Ratio ratio) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  for (int64_t layer = first_warp; layer < tab.num_layers; layer += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t* row = tab.rows + layer * NUM_COLS;
    float first = 0.0f, second = 0.0f;
    if (tab.phase == PHASE_APPLY) {
      first = tab.layer_sums[2 * layer];
      second = tab.layer_sums[2 * layer + 1];
    } else {
      for (int64_t c = row[COL_FIRST_CHUNK] + lane; c < row[COL_FIRST_CHUNK] + row[COL_NUM_CHUNKS]; c += 32) {
        first += tab.chunk_partials[2 * c];
        second += tab.chunk_partials[2 * c + 1];
      }
      first = warp_sum(first);
      second = warp_sum(second);
    }
    if (lane == 0 && tab.phase == PHASE_SUMS) {
      tab.layer_sums[2 * layer] = first;
      tab.layer_sums[2 * layer + 1] = second;
    } else if (lane == 0) {
      float* step = column_ptr<float>(row, COL_STEP);
      const float t = *step + 1.0f;
      *step = t;
      tab.layer_results[2 * layer] = ratio(first, second, t, (row[COL_FLAGS] & FLAG_EXCLUDED) != 0);
      tab.layer_results[2 * layer + 1] = t;
    }
  }
}

// Phase 3 visits the chunks in reverse: phase 1 ended on the highest chunks, so the first ones re-read here
// may still be in L2 (not measurable on the CPU-only development machines).
__device__ __forceinline__ int64_t reversed_chunk(const DeviceTable& tab, int64_t k) {
  return tab.num_chunks - 1 - k;
}

// ---------------------------------------------------------------- LARS family

template <typename scalar_t, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) lars_step_kernel(DeviceTable tab, LarsHyper h, DeviceScalars s) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;  // every block leaves before any barrier
  cg::grid_group grid = cg::this_grid();
  __shared__ float scratch[2][kWarps];
  const float grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;

  // Phase 1, skipped by PHASE_APPLY (as is its barrier: the phase is the same in every block).
  for (int64_t c = blockIdx.x; c < tab.num_chunks && tab.phase != PHASE_APPLY; c += gridDim.x) {
    const int64_t* row = tab.rows + static_cast<int64_t>(tab.chunk_layer[c]) * NUM_COLS;
    float w_sq = 0.0f, denom_sq = 0.0f;
    if (!(row[COL_FLAGS] & FLAG_EXCLUDED)) {  // excluded layers have no trust ratio: nothing to sum
      const ElementRange r = chunk_elements(row, c, tab.chunk_size);
      const bool vec = packable(row);
      const weight_t* w_in = weights_of<weight_t>(row);
      const scalar_t* g_in = column_ptr<const scalar_t>(row, COL_GRAD);
      for (int64_t i = r.begin + threadIdx.x * kPack; i < r.end; i += kThreads * kPack) {
        float w[kPack], g[kPack];
        load_pack(w_in, i, r.end, vec, w);
        load_pack(g_in, i, r.end, vec, g);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          if (i + j >= r.end) continue;
          const float gj = effective_grad(g[j], grad_scale, 1.0f);
          const float term = lars_denominator_term(gj, lars_decayed_grad(gj, w[j], h.weight_decay, false),
                                                   h.sum_of_norms);
          w_sq += w[j] * w[j];
          denom_sq += term * term;
        }
      }
    }
    block_sum2(w_sq, denom_sq, scratch);
    if (threadIdx.x == 0) {
      tab.chunk_partials[2 * c] = w_sq;
      tab.chunk_partials[2 * c + 1] = denom_sq;
    }
  }
  if (tab.phase != PHASE_APPLY) grid.sync();

  reduce_layers(tab, [&](float w_sq, float denom_sq, float t, bool excluded) {
    return lars_trust_ratio(h, w_sq, denom_sq, t, excluded);
  });
  if (tab.phase == PHASE_SUMS) return;  // every block: no barrier follows
  grid.sync();

  const float lr = s.lr != nullptr ? *s.lr : h.lr;
  for (int64_t k = blockIdx.x; k < tab.num_chunks; k += gridDim.x) {
    const int64_t c = reversed_chunk(tab, k);
    const int64_t layer = tab.chunk_layer[c];
    const int64_t* row = tab.rows + layer * NUM_COLS;
    const float q = tab.layer_results[2 * layer];
    const bool excluded = row[COL_FLAGS] & FLAG_EXCLUDED;
    const ElementRange r = chunk_elements(row, c, tab.chunk_size);
    const bool vec = packable(row);
    const weight_t* w_in = weights_of<weight_t>(row);
    const scalar_t* g_in = column_ptr<const scalar_t>(row, COL_GRAD);
    float* buf_io = column_ptr<float>(row, COL_STATE0);
    for (int64_t i = r.begin + threadIdx.x * kPack; i < r.end; i += kThreads * kPack) {
      float w[kPack], g[kPack], buf[kPack];
      load_pack(w_in, i, r.end, vec, w);
      load_pack(g_in, i, r.end, vec, g);
      load_pack(buf_io, i, r.end, vec, buf);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float d = lars_decayed_grad(effective_grad(g[j], grad_scale, 1.0f), w[j], h.weight_decay, excluded);
        lars_apply(h, lr, q, d, w[j], buf[j]);
      }
      store_pack(buf_io, i, r.end, vec, buf);
      store_weights<scalar_t, kHasMaster>(row, i, r.end, vec, w);
    }
  }
}

// ---------------------------------------------------------------- LAMB

struct BiasCorrections {
  float first;
  float second;
};

__device__ __forceinline__ BiasCorrections bias_corrections(const LambHyper& h, float t) {
  if (!h.bias_correction) return {1.0f, 1.0f};
  return {bias_correction(t, h.log_beta1), bias_correction(t, h.log_beta2)};
}

template <typename scalar_t, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) lamb_step_kernel(DeviceTable tab, LambHyper h, DeviceScalars s) {
  using weight_t = std::conditional_t<kHasMaster, float, scalar_t>;
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;  // every block leaves before any barrier
  cg::grid_group grid = cg::this_grid();
  __shared__ float scratch[2][kWarps];
  const float grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;
  const float grad_mult = s.clip_coef != nullptr ? *s.clip_coef : 1.0f;

  // Phase 1: moments, then sums of w^2 and u^2. The step count is read here (t = old + 1) and written only
  // in phase 2, after the barrier (by PHASE_APPLY's call). Skipped by PHASE_APPLY, as is its barrier.
  for (int64_t c = blockIdx.x; c < tab.num_chunks && tab.phase != PHASE_APPLY; c += gridDim.x) {
    const int64_t* row = tab.rows + static_cast<int64_t>(tab.chunk_layer[c]) * NUM_COLS;
    const ElementRange r = chunk_elements(row, c, tab.chunk_size);
    const bool vec = packable(row);
    const float decay = lamb_decay(h, row[COL_FLAGS] & FLAG_EXCLUDED);
    const BiasCorrections bc = bias_corrections(h, *column_ptr<const float>(row, COL_STEP) + 1.0f);
    const weight_t* w_in = weights_of<weight_t>(row);
    const scalar_t* g_in = column_ptr<const scalar_t>(row, COL_GRAD);
    float* m_io = column_ptr<float>(row, COL_STATE0);
    float* v_io = column_ptr<float>(row, COL_STATE1);
    float w_sq = 0.0f, u_sq = 0.0f;
    for (int64_t i = r.begin + threadIdx.x * kPack; i < r.end; i += kThreads * kPack) {
      float w[kPack], g[kPack], m[kPack], v[kPack];
      load_pack(w_in, i, r.end, vec, w);
      load_pack(g_in, i, r.end, vec, g);
      load_pack(m_io, i, r.end, vec, m);
      load_pack(v_io, i, r.end, vec, v);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (i + j >= r.end) continue;
        lamb_moments(h, effective_grad(g[j], grad_scale, grad_mult), m[j], v[j]);
        const float u = lamb_update(m[j], v[j], w[j], bc.first, bc.second, h.eps, decay);
        w_sq += w[j] * w[j];
        u_sq += u * u;
      }
      store_pack(m_io, i, r.end, vec, m);
      store_pack(v_io, i, r.end, vec, v);
    }
    block_sum2(w_sq, u_sq, scratch);
    if (threadIdx.x == 0) {
      tab.chunk_partials[2 * c] = w_sq;
      tab.chunk_partials[2 * c + 1] = u_sq;
    }
  }
  if (tab.phase != PHASE_APPLY) grid.sync();

  reduce_layers(tab, [&](float w_sq, float u_sq, float, bool excluded) {
    return lamb_trust_ratio(h, w_sq, u_sq, excluded);
  });
  if (tab.phase == PHASE_SUMS) return;  // every block: no barrier follows
  grid.sync();

  // Phase 3: u again from the stored moments, then w -= lr*q*u.
  const float lr = s.lr != nullptr ? *s.lr : h.lr;
  for (int64_t k = blockIdx.x; k < tab.num_chunks; k += gridDim.x) {
    const int64_t c = reversed_chunk(tab, k);
    const int64_t layer = tab.chunk_layer[c];
    const int64_t* row = tab.rows + layer * NUM_COLS;
    const float lr_q = lr * tab.layer_results[2 * layer];
    const BiasCorrections bc = bias_corrections(h, tab.layer_results[2 * layer + 1]);
    const float decay = lamb_decay(h, row[COL_FLAGS] & FLAG_EXCLUDED);
    const ElementRange r = chunk_elements(row, c, tab.chunk_size);
    const bool vec = packable(row);
    const weight_t* w_in = weights_of<weight_t>(row);
    const float* m_in = column_ptr<const float>(row, COL_STATE0);
    const float* v_in = column_ptr<const float>(row, COL_STATE1);
    for (int64_t i = r.begin + threadIdx.x * kPack; i < r.end; i += kThreads * kPack) {
      float w[kPack], m[kPack], v[kPack];
      load_pack(w_in, i, r.end, vec, w);
      load_pack(m_in, i, r.end, vec, m);
      load_pack(v_in, i, r.end, vec, v);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        w[j] = w[j] - lr_q * lamb_update(m[j], v[j], w[j], bc.first, bc.second, h.eps, decay);
      }
      store_weights<scalar_t, kHasMaster>(row, i, r.end, vec, w);
    }
  }
}

// ---------------------------------------------------------------- launch

// The largest grid whose blocks are all co-resident (the condition for grid.sync()), capped by the chunks.
template <typename Kernel>
int cooperative_grid(Kernel kernel, int64_t num_chunks, int device) {
  int cooperative = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(cooperative, "tvlars_fused: CUDA device ", device, " does not support cooperative launches");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  TORCH_CHECK(per_sm > 0, "tvlars_fused: the step kernel cannot be resident on device ", device);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(sms) * per_sm, num_chunks)));
}

template <typename Kernel, typename Hyper>
void launch(Kernel kernel, const DeviceTable& tab, const Hyper& h, const DeviceScalars& s, const at::Device& device) {
  const int grid = cooperative_grid(kernel, tab.num_chunks, device.index());
  DeviceTable tab_arg = tab;
  Hyper h_arg = h;
  DeviceScalars s_arg = s;
  void* args[] = {&tab_arg, &h_arg, &s_arg};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(grid), dim3(kThreads), args, 0,
                                             c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}

// The device table to read: `layers`, or a fresh device copy of the rows when the lists hold other tensors
// than the table (functionalization's copies under torch.compile). `keep` owns the copy until the launch.
DeviceTable device_table(const at::Tensor& layers, const at::Tensor& layers_host, const at::Tensor& chunk_layer,
                         const TensorColumns& cols, int64_t num_chunks, int64_t chunk_size,
                         const at::Tensor& workspace, int64_t phase, float* layer_sums, at::Tensor& keep) {
  const std::optional<at::Tensor> fresh = rows_for_lists(layers_host, cols);
  keep = fresh.has_value() ? fresh->to(layers.device()) : layers;
  float* partials = workspace.data_ptr<float>();
  return {keep.data_ptr<int64_t>(), chunk_layer.data_ptr<int32_t>(), layers_host.size(0), num_chunks, chunk_size,
          partials, partials + 2 * num_chunks, phase, layer_sums};
}

}  // namespace

void lars_step_cuda(TVLARS_LARS_STEP_ARGS) {
  const TensorColumns cols{params, grads, momentum_buffers, {}, masters, steps};
  const CheckedStep checked = check_step("lars_step", layers, layers_host, chunk_layer, cols, workspace, chunk_size,
                                         lr_tensor, grad_scale, found_inf, std::nullopt, layer_sums, phase);
  const c10::cuda::CUDAGuard guard(checked.device);
  at::Tensor rows;
  const DeviceTable tab = device_table(layers, layers_host, chunk_layer, cols, checked.num_chunks, chunk_size,
                                       workspace, phase, checked.layer_sums, rows);
  const LarsHyper h = make_lars_hyper(lr, momentum, weight_decay, eta, eps, norm_clip, sum_of_norms, nesterov,
                                      use_phi, lmbda, alpha, delay, gamma_min);
  const DeviceScalars s{optional_ptr(lr_tensor), optional_ptr(grad_scale), optional_ptr(found_inf), nullptr};
  dispatch_dtype(params[0].scalar_type(), !masters.empty(), [&](auto scalar, auto has_master) {
    launch(lars_step_kernel<decltype(scalar), decltype(has_master)::value>, tab, h, s, checked.device);
  });
}

void lamb_step_cuda(TVLARS_LAMB_STEP_ARGS) {
  const TensorColumns cols{params, grads, exp_avgs, exp_avg_sqs, masters, steps};
  TORCH_CHECK(!exp_avg_sqs.empty(), "lamb_step: exp_avg_sqs is empty");
  const CheckedStep checked = check_step("lamb_step", layers, layers_host, chunk_layer, cols, workspace, chunk_size,
                                         lr_tensor, grad_scale, found_inf, clip_coef, layer_sums, phase);
  const c10::cuda::CUDAGuard guard(checked.device);
  at::Tensor rows;
  const DeviceTable tab = device_table(layers, layers_host, chunk_layer, cols, checked.num_chunks, chunk_size,
                                       workspace, phase, checked.layer_sums, rows);
  const LambHyper h = make_lamb_hyper(lr, beta1, beta2, eps, weight_decay, bias_correction, norm_clip);
  const DeviceScalars s{optional_ptr(lr_tensor), optional_ptr(grad_scale), optional_ptr(found_inf),
                        optional_ptr(clip_coef)};
  dispatch_dtype(params[0].scalar_type(), !masters.empty(), [&](auto scalar, auto has_master) {
    launch(lamb_step_kernel<decltype(scalar), decltype(has_master)::value>, tab, h, s, checked.device);
  });
}

}  // namespace tvlars

TORCH_LIBRARY_IMPL(tvlars_fused, CUDA, m) {
  m.impl("lars_step", &tvlars::lars_step_cuda);
  m.impl("lamb_step", &tvlars::lamb_step_cuda);
}
