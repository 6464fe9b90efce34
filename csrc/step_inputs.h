// Checking the arguments of the tvlars_fused ops and turning them into the StepArgs a device's step reads.
//
// Two op forms share one step function per optimizer and device. The list form (torch.compile) also takes
// every tensor the step writes, so that the compiler sees the mutations; it checks the lists against the
// table, and under functionalization the lists can hold copies of the tensors the table was built for, so
// `rows_for_lists` compares the two and builds fresh rows from the lists when they differ: the op always
// writes to exactly the tensors it was given. The table form (eager) takes the layer table only, whose
// tensors were checked when it was built (tvlars_fused/_layer_table.py): its checks cost O(num_layers)
// integer reads of the host table, no tensor-list walking.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "layer_table.h"
#include "optimizer_math.h"

namespace tvlars {

struct TensorColumns {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList state0;
  at::TensorList state1;  // empty for LARS
  at::TensorList masters;  // empty when there are no master weights
  at::TensorList steps;
  at::TensorList comps;  // Kahan compensations of bfloat16 params; empty when there are none
};

inline void check_list(const char* op, const char* name, at::TensorList list, int64_t num_layers,
                       const at::Tensor& layers_host, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == num_layers, op, ": ", name, " has ", list.size(),
              " tensors but the layer table has ", num_layers, " layers");
  const int64_t* rows = layers_host.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_layers; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                ", expected ", dtype);
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.numel() == rows[i * NUM_COLS + COL_NUMEL], op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but the layer table says ", rows[i * NUM_COLS + COL_NUMEL]);
    TORCH_CHECK(t.numel() <= 1 || t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                "] is not dense (strided layers belong to the foreach path)");
  }
}

inline void check_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), ", expected ", device);
}

// What one op call does (its `phase` argument). Sharded layers (FSDP2) need whole-layer norms, so their step
// is split around one all-reduce: PHASE_SUMS writes the local per-layer sums of squares to layer_sums (LAMB
// also updates the moments) and nothing else; the caller sums layer_sums over the ranks; PHASE_APPLY reads
// them, advances the step counts and applies the update. PHASE_FULL is the ordinary one-call step.
enum StepPhase : int64_t { PHASE_FULL = 0, PHASE_SUMS = 1, PHASE_APPLY = 2 };

// The [num_layers, 2] float64 sums a split phase writes or reads; nullptr for PHASE_FULL.
inline double* check_layer_sums(const char* op, const std::optional<at::Tensor>& layer_sums, int64_t phase,
                                int64_t num_layers, const at::Device& device) {
  TORCH_CHECK(phase == PHASE_FULL || phase == PHASE_SUMS || phase == PHASE_APPLY, op,
              ": phase must be 0 (whole step), 1 (sums) or 2 (apply), got ", phase);
  if (phase == PHASE_FULL) {
    TORCH_CHECK(!layer_sums.has_value(), op, ": layer_sums is read or written by phases 1 and 2 only");
    return nullptr;
  }
  TORCH_CHECK(layer_sums.has_value() && layer_sums->scalar_type() == at::kDouble &&
                  layer_sums->device() == device && layer_sums->dim() == 2 && layer_sums->size(0) == num_layers &&
                  layer_sums->size(1) == 2 && layer_sums->is_contiguous(),
              op, ": phase ", phase, " needs layer_sums, a contiguous float64 tensor of shape [", num_layers,
              ", 2] on ", device);
  return layer_sums->data_ptr<double>();
}

// Everything one op call gives a device's step function, checked; the same for both op forms.
struct StepArgs {
  at::Tensor layers;     // the table on `device`
  at::Tensor rows_host;  // the rows to step, on the host: layers_host, or fresh rows (see fresh_rows)
  bool fresh_rows;       // list form only: the lists hold other tensors than the table, rows_host has their
                         // pointers, and a device step must read rows_host (uploaded) instead of `layers`
  at::Tensor chunk_layer;
  at::Tensor workspace;
  int64_t num_layers;
  int64_t num_chunks;
  int64_t chunk_size;
  at::ScalarType dtype;  // of the parameters and gradients
  bool has_master;
  at::ScalarType state_dtype;  // of the state tensors: float32, or bfloat16 (docs/algorithms.md section 9)
  bool has_comp;               // bfloat16 params carry a Kahan compensation (COL_COMP)
  at::Device device;
  double* chunk_partials;  // workspace: [num_chunks][2] sums of squares of each chunk
  double* layer_results;   // workspace after the partials: [num_layers][2] trust ratio, new step count
  double* layer_sums;      // [num_layers][2]: written by PHASE_SUMS, read by PHASE_APPLY; else nullptr
  int64_t phase;           // StepPhase
  // One-element float32 tensors on `device`, or nullptr when absent: the lr (else the hyper-parameter's),
  // GradScaler's scale (1) and inf flag (0), LAMB's global clip coefficient (1).
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;
};

inline const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The checks both forms share: the table, the chunk map, the workspace, the device scalars and the phase.
// `device` is where the layers are; `dtype` and `has_master` describe the parameters.
inline StepArgs check_common(const char* op, const at::Tensor& layers, const at::Tensor& layers_host,
                             const at::Tensor& chunk_layer, const at::Tensor& workspace, at::ScalarType dtype,
                             bool has_master, at::ScalarType state_dtype, bool has_comp, const at::Device& device,
                             int64_t chunk_size,
                             const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                             const std::optional<at::Tensor>& layer_sums, int64_t phase) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": params must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(!has_master || dtype != at::kFloat, op, ": master weights are for bfloat16/float16 params only");
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16, op,
              ": state_dtype must be float32 or bfloat16, got ", state_dtype);
  TORCH_CHECK(!has_comp || (dtype == at::kBFloat16 && !has_master), op,
              ": a Kahan compensation (comps) is for bfloat16 params without master weights, got ", dtype,
              " params", has_master ? " with master weights" : "");
  TORCH_CHECK(layers_host.device().is_cpu() && layers_host.scalar_type() == at::kLong && layers_host.dim() == 2 &&
                  layers_host.size(1) == NUM_COLS && layers_host.is_contiguous(),
              op, ": layers_host must be a contiguous CPU int64 tensor of shape [num_layers, ", NUM_COLS, "]");
  TORCH_CHECK(layers.device() == device && layers.sizes() == layers_host.sizes() &&
                  layers.scalar_type() == at::kLong && layers.is_contiguous(),
              op, ": layers must be layers_host's copy on ", device);
  const int64_t num_layers = layers_host.size(0);
  TORCH_CHECK(num_layers > 0, op, ": the layer table is empty");
  TORCH_CHECK(chunk_size > 0 && chunk_size % 4 == 0, op, ": chunk_size must be a positive multiple of 4, got ",
              chunk_size);
  TORCH_CHECK(chunk_layer.device() == device && chunk_layer.scalar_type() == at::kInt && chunk_layer.dim() == 1 &&
                  chunk_layer.is_contiguous(),
              op, ": chunk_layer must be a contiguous int32 vector on ", device);
  const int64_t* last = layers_host.data_ptr<int64_t>() + (num_layers - 1) * NUM_COLS;
  const int64_t num_chunks = last[COL_FIRST_CHUNK] + last[COL_NUM_CHUNKS];
  TORCH_CHECK(chunk_layer.numel() == num_chunks, op, ": chunk_layer has ", chunk_layer.numel(),
              " entries but the layer table has ", num_chunks, " chunks");
  TORCH_CHECK(workspace.device() == device && workspace.scalar_type() == at::kDouble && workspace.is_contiguous() &&
                  workspace.numel() >= 2 * (num_chunks + num_layers),
              op, ": workspace must be a contiguous float64 tensor of at least 2 * (num_chunks + num_layers) = ",
              2 * (num_chunks + num_layers), " elements on ", device);
  check_scalar(op, "lr_tensor", lr_tensor, device);
  check_scalar(op, "grad_scale", grad_scale, device);
  check_scalar(op, "found_inf", found_inf, device);
  check_scalar(op, "clip_coef", clip_coef, device);
  double* partials = workspace.data_ptr<double>();
  return StepArgs{layers, layers_host, false, chunk_layer, workspace, num_layers, num_chunks, chunk_size, dtype,
                  has_master, state_dtype, has_comp, device, partials, partials + 2 * num_chunks,
                  check_layer_sums(op, layer_sums, phase, num_layers, device), phase, optional_ptr(lr_tensor),
                  optional_ptr(grad_scale), optional_ptr(found_inf), optional_ptr(clip_coef)};
}

// The table form: the arguments above, and the table's own rows, O(num_layers). A table built under
// torch.compile has no addresses (pointer columns 0) and belongs to the list form; the layout must be the
// one the workspace was sized for.
inline StepArgs check_table_step(const char* op, const at::Tensor& layers, const at::Tensor& layers_host,
                                 const at::Tensor& chunk_layer, const at::Tensor& workspace, at::ScalarType dtype,
                                 bool has_master, at::ScalarType state_dtype, bool has_comp, bool two_states,
                                 int64_t chunk_size,
                                 const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::Tensor>& clip_coef,
                                 const std::optional<at::Tensor>& layer_sums, int64_t phase) {
  StepArgs args = check_common(op, layers, layers_host, chunk_layer, workspace, dtype, has_master, state_dtype,
                               has_comp, layers.device(), chunk_size, lr_tensor, grad_scale, found_inf, clip_coef,
                               layer_sums, phase);
  const int64_t* rows = layers_host.data_ptr<int64_t>();
  int64_t next_chunk = 0;
  for (int64_t i = 0; i < args.num_layers; ++i) {
    const int64_t* row = rows + i * NUM_COLS;
    const int64_t numel = row[COL_NUMEL];
    TORCH_CHECK(numel >= 0 && row[COL_FIRST_CHUNK] == next_chunk &&
                    row[COL_NUM_CHUNKS] == (numel == 0 ? 1 : (numel + chunk_size - 1) / chunk_size),
                op, ": layer ", i, "'s row does not describe chunks of ", chunk_size, " elements in order");
    next_chunk += row[COL_NUM_CHUNKS];
    // An empty tensor may have a null data pointer; every other tensor of the step must have an address.
    const bool addressed = row[COL_STEP] != 0 &&
        (numel == 0 || (row[COL_PARAM] != 0 && row[COL_GRAD] != 0 && row[COL_STATE0] != 0 &&
                        (!two_states || row[COL_STATE1] != 0)));
    TORCH_CHECK(addressed, op, ": layer ", i, " has no tensor addresses in the table (a table built under "
                "torch.compile belongs to the list-form op)");
    TORCH_CHECK(has_master || row[COL_MASTER] == 0, op, ": layer ", i,
                " has a master weight but has_master is false");
    TORCH_CHECK(!has_master || numel == 0 || row[COL_MASTER] != 0, op, ": layer ", i,
                " has no master weight but has_master is true");
    TORCH_CHECK(has_comp || row[COL_COMP] == 0, op, ": layer ", i,
                " has a Kahan compensation but has_comp is false");
    TORCH_CHECK(!has_comp || numel == 0 || row[COL_COMP] != 0, op, ": layer ", i,
                " has no Kahan compensation but has_comp is true");
  }
  return args;
}

// The table's rows with the lists' pointers: nullopt when the table already points at these tensors.
inline std::optional<at::Tensor> rows_for_lists(const at::Tensor& layers_host, const TensorColumns& cols) {
  const int64_t num_layers = layers_host.size(0);
  const int64_t* rows = layers_host.data_ptr<int64_t>();
  auto ptr = [](at::TensorList list, int64_t i) -> int64_t {
    return list.empty() ? 0 : reinterpret_cast<intptr_t>(list[i].data_ptr());
  };
  const std::pair<int, at::TensorList> columns[] = {{COL_PARAM, cols.params},   {COL_GRAD, cols.grads},
                                                    {COL_STATE0, cols.state0},  {COL_STATE1, cols.state1},
                                                    {COL_MASTER, cols.masters}, {COL_STEP, cols.steps},
                                                    {COL_COMP, cols.comps}};
  bool same = true;
  for (int64_t i = 0; i < num_layers && same; ++i) {
    for (const auto& column : columns) same = same && rows[i * NUM_COLS + column.first] == ptr(column.second, i);
  }
  if (same) return std::nullopt;
  at::Tensor fresh = layers_host.clone();
  int64_t* out = fresh.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_layers; ++i) {
    for (const auto& column : columns) out[i * NUM_COLS + column.first] = ptr(column.second, i);
  }
  return fresh;
}

// The list form: every list against the table, then the shared checks; the table's own rows are used when
// they point at the lists' tensors, else fresh rows from the lists.
inline StepArgs check_list_step(const char* op, const at::Tensor& layers, const at::Tensor& layers_host,
                                const at::Tensor& chunk_layer, const TensorColumns& cols, bool two_states,
                                const at::Tensor& workspace, at::ScalarType state_dtype, int64_t chunk_size,
                                const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                                const std::optional<at::Tensor>& layer_sums, int64_t phase) {
  TORCH_CHECK(!cols.params.empty(), op, ": params is empty");
  const at::Device device = cols.params[0].device();
  const at::ScalarType dtype = cols.params[0].scalar_type();
  StepArgs args = check_common(op, layers, layers_host, chunk_layer, workspace, dtype, !cols.masters.empty(),
                               state_dtype, !cols.comps.empty(), device, chunk_size, lr_tensor, grad_scale, found_inf,
                               clip_coef, layer_sums, phase);
  const int64_t num_layers = args.num_layers;
  check_list(op, "params", cols.params, num_layers, layers_host, dtype, device);
  check_list(op, "grads", cols.grads, num_layers, layers_host, dtype, device);
  check_list(op, "state", cols.state0, num_layers, layers_host, state_dtype, device);
  if (two_states) check_list(op, "exp_avg_sqs", cols.state1, num_layers, layers_host, state_dtype, device);
  if (!cols.masters.empty()) check_list(op, "masters", cols.masters, num_layers, layers_host, at::kFloat, device);
  if (!cols.comps.empty()) check_list(op, "comps", cols.comps, num_layers, layers_host, at::kBFloat16, device);
  TORCH_CHECK(static_cast<int64_t>(cols.steps.size()) == num_layers, op, ": steps has ", cols.steps.size(),
              " tensors but the layer table has ", num_layers, " layers");
  for (int64_t i = 0; i < num_layers; ++i) {
    const at::Tensor& s = cols.steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device, op, ": steps[", i,
                "] must be a float32 scalar on ", device);
    for (at::TensorList list : {cols.grads, cols.state0, cols.state1, cols.masters, cols.comps}) {
      if (!list.empty() && cols.params[i].numel() > 1) {
        TORCH_CHECK(list[i].strides() == cols.params[i].strides(), op, ": layer ", i,
                    " has tensors of different memory layouts");
      }
    }
  }
  std::optional<at::Tensor> fresh = rows_for_lists(layers_host, cols);
  if (fresh.has_value()) {
    args.rows_host = *fresh;
    args.fresh_rows = true;
  }
  return args;
}

// Where a step reads its weights from and writes them to: the parameter itself; the float32 master weight (the
// parameter receives the rounded copy); or, for bfloat16 parameters, the parameter plus its bfloat16 Kahan
// compensation (the new weight is split between the two).
enum WeightSource : int { kParamWeights = 0, kMasterWeights = 1, kKahanWeights = 2 };

template <int kSource>
using WeightSourceConstant = std::integral_constant<int, kSource>;

// Calls fn(scalar_t{}, WeightSourceConstant<source>{}, std::bool_constant<bfloat16 state>{}) for the step's
// parameter dtype, weight source and state dtype: 6 (dtype, source) pairs times 2 state dtypes.
template <typename Fn>
void dispatch_step(const StepArgs& args, Fn&& fn) {
  auto with_state = [&](auto scalar, auto source) {
    if (args.state_dtype == at::kBFloat16) {
      fn(scalar, source, std::true_type{});
    } else {
      fn(scalar, source, std::false_type{});
    }
  };
  switch (args.dtype) {
    case at::kFloat:
      with_state(float{}, WeightSourceConstant<kParamWeights>{});
      break;
    case at::kBFloat16:
      if (args.has_master) {
        with_state(c10::BFloat16{}, WeightSourceConstant<kMasterWeights>{});
      } else if (args.has_comp) {
        with_state(c10::BFloat16{}, WeightSourceConstant<kKahanWeights>{});
      } else {
        with_state(c10::BFloat16{}, WeightSourceConstant<kParamWeights>{});
      }
      break;
    case at::kHalf:
      if (args.has_master) {
        with_state(c10::Half{}, WeightSourceConstant<kMasterWeights>{});
      } else {
        with_state(c10::Half{}, WeightSourceConstant<kParamWeights>{});
      }
      break;
    default:
      TORCH_CHECK(false, "unsupported parameter dtype ", args.dtype);
  }
}

// The optional bounds of a computed trust ratio, checked: min <= max when both are given.
// The seed of the stochastic-rounding stream: a uint32, passed as an int64 by the schemas.
inline uint32_t checked_seed(const char* op, int64_t seed) {
  TORCH_CHECK(seed >= 0 && seed <= int64_t{0xFFFFFFFF}, op, ": seed must be in [0, 2**32), got ", seed);
  return static_cast<uint32_t>(seed);
}

inline void check_trust_ratio_bounds(const char* op, std::optional<double> min_trust_ratio,
                                     std::optional<double> max_trust_ratio) {
  TORCH_CHECK(!min_trust_ratio.has_value() || !max_trust_ratio.has_value() || *min_trust_ratio <= *max_trust_ratio,
              op, ": min_trust_ratio (", min_trust_ratio.value_or(0.0), ") must not exceed max_trust_ratio (",
              max_trust_ratio.value_or(0.0), ")");
}

inline LarsHyper make_lars_hyper(const char* op, double lr, double momentum, double weight_decay, double eta,
                                 double eps, std::optional<double> norm_clip, bool sum_of_norms, bool nesterov,
                                 bool use_phi, double lmbda, double alpha, double delay, double gamma_min,
                                 double dampening, bool trust_clip, std::optional<double> min_trust_ratio,
                                 std::optional<double> max_trust_ratio, bool adapt, bool stochastic, int64_t seed) {
  check_trust_ratio_bounds(op, min_trust_ratio, max_trust_ratio);
  LarsHyper h;
  h.stochastic_rounding = stochastic;
  h.seed = checked_seed(op, seed);
  h.lr = static_cast<float>(lr);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_dampening = static_cast<float>(1.0 - dampening);
  h.weight_decay = static_cast<float>(weight_decay);
  h.eta = eta;
  h.eps = eps;
  h.has_norm_clip = norm_clip.has_value();
  h.norm_clip = norm_clip.value_or(0.0);
  h.has_min_trust_ratio = min_trust_ratio.has_value();
  h.min_trust_ratio = min_trust_ratio.value_or(0.0);
  h.has_max_trust_ratio = max_trust_ratio.has_value();
  h.max_trust_ratio = max_trust_ratio.value_or(0.0);
  h.sum_of_norms = sum_of_norms;
  h.nesterov = nesterov;
  h.use_phi = use_phi;
  h.trust_clip = trust_clip;
  h.adapt = adapt;
  h.lmbda = static_cast<float>(lmbda);
  h.alpha = static_cast<float>(alpha);
  h.delay = static_cast<float>(delay);
  h.gamma_min = static_cast<float>(gamma_min);
  return h;
}

inline LambHyper make_lamb_hyper(const char* op, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, bool bias_correction, std::optional<double> norm_clip,
                                 bool grad_averaging, bool decoupled_decay, std::optional<double> min_trust_ratio,
                                 std::optional<double> max_trust_ratio, bool adapt, bool stochastic, int64_t seed) {
  // beta = 0 is allowed: log(0) = -inf gives a bias correction of -expm1(-inf) = 1, as 1 - 0**t is.
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  check_trust_ratio_bounds(op, min_trust_ratio, max_trust_ratio);
  LambHyper h;
  h.stochastic_rounding = stochastic;
  h.seed = checked_seed(op, seed);
  h.lr = static_cast<float>(lr);
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.first_moment_factor = grad_averaging ? static_cast<float>(1.0 - beta1) : 1.0f;
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.log_beta1 = static_cast<float>(std::log(beta1));
  h.log_beta2 = static_cast<float>(std::log(beta2));
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  h.has_norm_clip = norm_clip.has_value();
  h.norm_clip = norm_clip.value_or(0.0);
  h.has_min_trust_ratio = min_trust_ratio.has_value();
  h.min_trust_ratio = min_trust_ratio.value_or(0.0);
  h.has_max_trust_ratio = max_trust_ratio.has_value();
  h.max_trust_ratio = max_trust_ratio.value_or(0.0);
  h.bias_correction = bias_correction;
  h.decoupled_decay = decoupled_decay;
  h.adapt = adapt;
  return h;
}

}  // namespace tvlars
