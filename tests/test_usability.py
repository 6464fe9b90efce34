"""What a new user meets: which backend runs each bucket, what an unavailable backend suggests instead, and the
foreach backend's found_inf masking that a GPU step uses (run here on CPU tensors)."""

import pytest
import torch

from buckets import assert_buckets_equal, clone_bucket, make_bucket
from cases import SMALL_SHAPES
from tvlars_fused import LAMB, LARS, TVLARS, BackendUnavailableError, _foreach, available_backends
from tvlars_fused._types import LambHyper, LarsHyper


def test_chosen_backends_and_repr_say_what_auto_picked():
    params = [torch.zeros(3, 3, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    opt = TVLARS([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    auto = "cpp" if available_backends("cpu")["cpp"] is None else "foreach"
    assert opt.chosen_backends == [
        dict(group=0, device="cpu", dtype="float32", backend=auto),
        dict(group=1, device="cpu", dtype="float64", backend="foreach"),  # the kernels compute in float32
    ]
    assert f"group 0 cpu float32: {auto}" in repr(opt) and "backend: auto" in repr(opt)


def test_an_unavailable_backend_names_the_ones_that_run():
    with pytest.raises(BackendUnavailableError, match=r"steps cuda parameters only.*Backends that run on cpu here: "
                                                      r"reference, foreach"):
        LARS([torch.zeros(2, requires_grad=True)], lr=0.1, backend="cuda")


@pytest.mark.parametrize("lamb", [False, True], ids=["lars", "lamb"])
@pytest.mark.parametrize("flag", [1.0, 0.0])
def test_foreach_restores_on_the_device_what_a_skipped_step_wrote(lamb, flag):
    """The GPU path of foreach's found_inf (no host read) on CPU tensors: with the flag set nothing changes, else
    the result is the plain step's."""
    hp = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                   norm_clip=10.0) if lamb else LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0,
                                                          norm_clip=None, sum_of_norms=False, nesterov=False,
                                                          use_phi=False)
    step = _foreach.lamb_step if lamb else _foreach.lars_step
    bucket = make_bucket(SMALL_SHAPES, lamb=lamb)
    expected = clone_bucket(bucket)
    if not flag:
        step.unmasked(expected, hp, None)
    _foreach._step_then_restore(step.unmasked, bucket, hp, None, torch.tensor(flag))
    assert_buckets_equal(bucket, expected)
