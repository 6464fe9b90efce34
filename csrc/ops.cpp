// The tvlars_fused op schemas; the fake impls live in tvlars_fused/_extension.py. `layer_sums` and `phase`
// split a step of sharded layers around an all-reduce (StepPhase, step_inputs.h). `workspace` and
// `layer_sums` are float64 (the norms' sums of squares, step_inputs.h). `state_dtype` (float32 or bfloat16),
// `stochastic` and `seed` say how the state is stored, and `comps` (list form) or `has_comp` (table form) whether
// bfloat16 params carry a Kahan compensation (docs/algorithms.md, section 9); the stream's other inputs, each
// layer's number and first element's index, are the table's COL_LAYER_ID and COL_ELEMENT_OFFSET.
//
// Two forms per optimizer, one step behind both (step_ops.h):
// - lars_step / lamb_step take every tensor the step writes, declared mutable (alias annotations), so that
//   torch.compile and functionalization see the mutations. Checking those lists costs O(tensors) per call.
// - lars_step_table / lamb_step_table take the layer table only: the step writes the tensors the table points
//   at, which the schema cannot declare, so they are for eager steps only. They exist for host overhead: a
//   bucket of thousands of small layers would otherwise pay for passing and checking five tensor lists on
//   every step, while the table's tensors were checked once, when it was built.
#include <torch/library.h>

#include <vector>

#include "build_marker.h"
#include "layer_table.h"
#include "step_ops.h"

namespace {

// The element range [begin, end) of one chunk, computed by the same int64 code the kernels use: lets the
// tests check offsets beyond 2^31 without allocating such a layer.
std::vector<int64_t> chunk_elements_op(int64_t numel, int64_t first_chunk, int64_t chunk, int64_t chunk_size) {
  const tvlars::ElementRange range = tvlars::chunk_elements(numel, first_chunk, chunk, chunk_size);
  return {range.begin, range.end};
}

}  // namespace

TORCH_LIBRARY(tvlars_fused, m) {
  m.def(
      "lars_step(Tensor layers, Tensor layers_host, Tensor chunk_layer, Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, Tensor(d!)[] comps, Tensor(e!)[] steps, "
      "Tensor(f!) workspace, Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, float lr, float momentum, "
      "float weight_decay, float eta, float eps, float? norm_clip, bool sum_of_norms, bool nesterov, bool use_phi, "
      "float lmbda, float alpha, float delay, float gamma_min, float dampening, bool trust_clip, "
      "float? min_trust_ratio, float? max_trust_ratio, bool adapt, ScalarType state_dtype, bool stochastic, "
      "int seed, int chunk_size, Tensor(g!)? layer_sums=None, int phase=0) -> ()");
  m.def(
      "lamb_step(Tensor layers, Tensor layers_host, Tensor chunk_layer, Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, Tensor(e!)[] comps, "
      "Tensor(f!)[] steps, Tensor(g!) workspace, Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? clip_coef, float lr, float beta1, float beta2, float eps, float weight_decay, bool bias_correction, "
      "float? norm_clip, bool grad_averaging, bool decoupled_decay, float? min_trust_ratio, float? max_trust_ratio, "
      "bool adapt, ScalarType state_dtype, bool stochastic, int seed, int chunk_size, Tensor(h!)? layer_sums=None, "
      "int phase=0) -> ()");
  m.def(
      "lars_step_table(Tensor layers, Tensor layers_host, Tensor chunk_layer, Tensor(a!) workspace, "
      "ScalarType dtype, bool has_master, ScalarType state_dtype, bool has_comp, Tensor? lr_tensor, "
      "Tensor? grad_scale, Tensor? found_inf, float lr, float momentum, float weight_decay, float eta, float eps, "
      "float? norm_clip, bool sum_of_norms, bool nesterov, bool use_phi, float lmbda, float alpha, float delay, "
      "float gamma_min, float dampening, bool trust_clip, float? min_trust_ratio, float? max_trust_ratio, "
      "bool adapt, bool stochastic, int seed, int chunk_size, Tensor(b!)? layer_sums=None, int phase=0) -> ()");
  m.def(
      "lamb_step_table(Tensor layers, Tensor layers_host, Tensor chunk_layer, Tensor(a!) workspace, "
      "ScalarType dtype, bool has_master, ScalarType state_dtype, bool has_comp, Tensor? lr_tensor, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool bias_correction, float? norm_clip, bool grad_averaging, bool decoupled_decay, "
      "float? min_trust_ratio, float? max_trust_ratio, bool adapt, bool stochastic, int seed, int chunk_size, "
      "Tensor(b!)? layer_sums=None, int phase=0) -> ()");
  m.def("chunk_elements(int numel, int first_chunk, int chunk, int chunk_size) -> int[]", &chunk_elements_op);
}

TORCH_LIBRARY_IMPL(tvlars_fused, CPU, m) {
  m.impl("lars_step", &tvlars::lars_step_cpu);
  m.impl("lamb_step", &tvlars::lamb_step_cpu);
  m.impl("lars_step_table", &tvlars::lars_step_table_cpu);
  m.impl("lamb_step_table", &tvlars::lamb_step_table_cpu);
}
