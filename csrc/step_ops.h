// The C++ signatures of the tvlars_fused ops (schemas in ops.cpp); CPU impls in cpu_step.cpp, CUDA in
// cuda_step.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace tvlars {

#define TVLARS_LARS_STEP_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer, at::TensorList params, \
      at::TensorList grads, at::TensorList momentum_buffers, at::TensorList masters, at::TensorList steps,      \
      const at::Tensor &workspace, const std::optional<at::Tensor> &lr_tensor,                                   \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf, double lr,      \
      double momentum, double weight_decay, double eta, double eps, std::optional<double> norm_clip,           \
      bool sum_of_norms, bool nesterov, bool use_phi, double lmbda, double alpha, double delay,                \
      double gamma_min, int64_t chunk_size, const std::optional<at::Tensor> &layer_sums, int64_t phase

#define TVLARS_LAMB_STEP_ARGS                                                                                  \
  const at::Tensor &layers, const at::Tensor &layers_host, const at::Tensor &chunk_layer, at::TensorList params, \
      at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,        \
      at::TensorList steps, const at::Tensor &workspace, const std::optional<at::Tensor> &lr_tensor,            \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf,                 \
      const std::optional<at::Tensor> &clip_coef, double lr, double beta1, double beta2, double eps,           \
      double weight_decay, bool bias_correction, std::optional<double> norm_clip, int64_t chunk_size,            \
      const std::optional<at::Tensor> &layer_sums, int64_t phase

void lars_step_cpu(TVLARS_LARS_STEP_ARGS);
void lamb_step_cpu(TVLARS_LAMB_STEP_ARGS);

}  // namespace tvlars
