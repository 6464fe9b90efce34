// The C++ signatures of the tvlars_fused ops (schemas in ops.cpp) and the step functions behind them.
//
// Each optimizer has two ops: the list form (lars_step, lamb_step), which torch.compile traces, and the table
// form (lars_step_table, lamb_step_table), which eager steps call to skip the per-tensor checks. Both check
// their arguments into a StepArgs (step_inputs.h) and call the one step function of their optimizer and
// device: lars_run_cpu / lamb_run_cpu in cpu_step.cpp, lars_run_cuda / lamb_run_cuda in cuda_step.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "optimizer_math.h"
#include "step_inputs.h"

namespace tvlars {

#define TVLARS_LARS_STEP_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer, at::TensorList params, \
      at::TensorList grads, at::TensorList momentum_buffers, at::TensorList masters, at::TensorList comps,      \
      at::TensorList steps, const at::Tensor &workspace, const std::optional<at::Tensor> &lr_tensor,            \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf, double lr,      \
      double momentum, double weight_decay, double eta, double eps, std::optional<double> norm_clip,           \
      bool sum_of_norms, bool nesterov, bool use_phi, double lmbda, double alpha, double delay,                \
      double gamma_min, double dampening, bool trust_clip, std::optional<double> min_trust_ratio,             \
      std::optional<double> max_trust_ratio, bool adapt, at::ScalarType state_dtype, bool stochastic,          \
      int64_t seed, int64_t chunk_size, const std::optional<at::Tensor> &layer_sums, int64_t phase

#define TVLARS_LAMB_STEP_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer, at::TensorList params, \
      at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,        \
      at::TensorList comps, at::TensorList steps, const at::Tensor &workspace,                                  \
      const std::optional<at::Tensor> &lr_tensor, const std::optional<at::Tensor> &grad_scale,                 \
      const std::optional<at::Tensor> &found_inf, const std::optional<at::Tensor> &clip_coef, double lr,       \
      double beta1, double beta2, double eps, double weight_decay, bool bias_correction,                       \
      std::optional<double> norm_clip, bool grad_averaging, bool decoupled_decay,                               \
      std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio, bool adapt,                \
      at::ScalarType state_dtype, bool stochastic, int64_t seed, int64_t chunk_size,                           \
      const std::optional<at::Tensor> &layer_sums, int64_t phase

#define TVLARS_LARS_TABLE_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer,                      \
      const at::Tensor &workspace, at::ScalarType dtype, bool has_master, at::ScalarType state_dtype,          \
      bool has_comp, const std::optional<at::Tensor> &lr_tensor, const std::optional<at::Tensor> &grad_scale,  \
      const std::optional<at::Tensor> &found_inf, double lr, double momentum, double weight_decay, double eta,  \
      double eps, std::optional<double> norm_clip, bool sum_of_norms, bool nesterov, bool use_phi,             \
      double lmbda, double alpha, double delay, double gamma_min, double dampening, bool trust_clip,            \
      std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio, bool adapt,                \
      bool stochastic, int64_t seed, int64_t chunk_size, const std::optional<at::Tensor> &layer_sums,          \
      int64_t phase

#define TVLARS_LAMB_TABLE_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer,                      \
      const at::Tensor &workspace, at::ScalarType dtype, bool has_master, at::ScalarType state_dtype,          \
      bool has_comp, const std::optional<at::Tensor> &lr_tensor, const std::optional<at::Tensor> &grad_scale,  \
      const std::optional<at::Tensor> &found_inf, const std::optional<at::Tensor> &clip_coef, double lr,       \
      double beta1, double beta2, double eps, double weight_decay, bool bias_correction,                       \
      std::optional<double> norm_clip, bool grad_averaging, bool decoupled_decay,                               \
      std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio, bool adapt,                \
      bool stochastic, int64_t seed, int64_t chunk_size, const std::optional<at::Tensor> &layer_sums,          \
      int64_t phase

// The op implementations, registered by ops.cpp (CPU) and cuda_step.cu (CUDA).
void lars_step_cpu(TVLARS_LARS_STEP_ARGS);
void lamb_step_cpu(TVLARS_LAMB_STEP_ARGS);
void lars_step_table_cpu(TVLARS_LARS_TABLE_ARGS);
void lamb_step_table_cpu(TVLARS_LAMB_TABLE_ARGS);

// One step function per optimizer and device, behind both op forms. A step with *found_inf != 0 writes
// nothing (on the CUDA device the flag is read in the kernel).
void lars_run_cpu(const StepArgs& args, const LarsHyper& h);
void lamb_run_cpu(const StepArgs& args, const LambHyper& h);
void lars_run_cuda(const StepArgs& args, const LarsHyper& h);
void lamb_run_cuda(const StepArgs& args, const LambHyper& h);

// The arguments of the two forms, checked: what every op implementation starts with.
#define TVLARS_LARS_LIST_CHECKED(op)                                                                          \
  check_list_step(op, layers, layers_host, chunk_layer,                                                       \
                  TensorColumns{params, grads, momentum_buffers, {}, masters, steps, comps}, false, workspace,         \
                  state_dtype, chunk_size, lr_tensor, grad_scale, found_inf, std::nullopt, layer_sums, phase)
#define TVLARS_LAMB_LIST_CHECKED(op)                                                                          \
  check_list_step(op, layers, layers_host, chunk_layer,                                                       \
                  TensorColumns{params, grads, exp_avgs, exp_avg_sqs, masters, steps, comps}, true, workspace,        \
                  state_dtype, chunk_size, lr_tensor, grad_scale, found_inf, clip_coef, layer_sums, phase)
#define TVLARS_LARS_TABLE_CHECKED(op)                                                                         \
  check_table_step(op, layers, layers_host, chunk_layer, workspace, dtype, has_master, state_dtype, has_comp, \
                   false, chunk_size, lr_tensor, grad_scale, found_inf, std::nullopt, layer_sums, phase)
#define TVLARS_LAMB_TABLE_CHECKED(op)                                                                         \
  check_table_step(op, layers, layers_host, chunk_layer, workspace, dtype, has_master, state_dtype, has_comp, \
                   true, chunk_size, lr_tensor, grad_scale, found_inf, clip_coef, layer_sums, phase)
#define TVLARS_LARS_HYPER(op)                                                                                 \
  make_lars_hyper(op, lr, momentum, weight_decay, eta, eps, norm_clip, sum_of_norms, nesterov, use_phi, lmbda, \
                  alpha, delay, gamma_min, dampening, trust_clip, min_trust_ratio, max_trust_ratio, adapt,    \
                  stochastic, seed)
#define TVLARS_LAMB_HYPER(op)                                                                                 \
  make_lamb_hyper(op, lr, beta1, beta2, eps, weight_decay, bias_correction, norm_clip, grad_averaging,        \
                  decoupled_decay, min_trust_ratio, max_trust_ratio, adapt, stochastic, seed)

}  // namespace tvlars
