"""Device-generic tests of other modules, collected a second time here under the gpu mark.

tests/test_triton.py runs its tests on the GPU when there is one (its DEVICE is cuda there) but most carry no
gpu mark, and the cuda case of tests/test_optimizer_behaviour.py's dense non-contiguous layers test is unmarked,
so ``pytest -m gpu`` (bench/gpu_check.sh) would leave them out. pytest collects every test function a module
holds, imported ones included: imported here, they run again under this module's marks (gpu, and skipped where
there is no GPU, since their first collection covers the CPU; the cpp case runs again, the triton case skips).
The fixture they use is imported with them. Where Triton is missing on a GPU, tests/test_gpu_parity.py fails.
"""

import pytest
import torch

pytest.importorskip("triton")

from test_optimizer_behaviour import test_dense_non_contiguous_layers_go_through_the_kernel_in_place  # noqa: E402,F401
from test_triton import (  # noqa: E402,F401
    many_chunks,
    test_bfloat16_store_rounds_to_nearest_even,
    test_bias_correction_is_float32_accurate,
    test_bit_identical_across_runs,
    test_found_inf_writes_nothing,
    test_grad_scale_divides_gradients,
    test_lamb_clip_coef_multiplies_gradients,
    test_launch_between_the_passes_gives_the_bits_of_two_launches,
    test_layers_split_over_many_chunks_match_reference,
    test_lr_tensor_is_read_in_kernel_at_each_step,
    test_master_weights_over_many_chunks_match_reference,
    test_one_misaligned_layer_leaves_the_others_on_the_vector_path,
    test_phi_matches_float64_and_overflow_gives_gamma_min,
    test_sharded_found_inf_writes_nothing_but_joins_the_all_reduce,
    test_sharded_rank_with_only_empty_shards_steps,
    test_sharded_split_step_is_three_launches_around_one_all_reduce,
    test_sharded_split_step_matches_reference,
    test_sharded_split_step_on_one_rank_is_bit_identical_to_the_ordinary_step,
    test_strided_layers_are_updated_in_place_through_foreach,
    test_tvlars_with_overflowing_exp_matches_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
