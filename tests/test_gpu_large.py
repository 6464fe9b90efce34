"""One layer of more than 2**31 elements for each fused GPU backend (``cuda`` and ``triton``): every offset,
size and sum must be 64-bit. Marked slow and gpu; skips with the reason where there is no GPU or too little
free memory.
"""

import contextlib
import gc
import math

import pytest
import torch

from cases import backend_or_skip
from tvlars_fused import TVLARS, phi

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

NUMEL = (1 << 31) + (1 << 20) + 3  # past 2**31 and not a multiple of any chunk or vector width
# bfloat16 weights and gradient, float32 momentum (16 GiB), float64 temporaries of 2**27 elements.
NEEDED_BYTES = 22 * 2 ** 30
SUM_CHUNK = 1 << 27


@contextlib.contextmanager
def cuda_memory_released():
    """Gives a huge test's GPU memory back to the driver when it ends, passed or failed, so that a neighbouring
    pytest-xdist worker does not run out of memory: the caching allocator would keep it reserved for this process.
    A failure's traceback (which pytest keeps, in sys.last_traceback) would keep the tensors alive through its
    frames' locals, assertion temporaries included, so the finished frames are cleared first."""
    try:
        yield
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # still running: the test and this function
                pass
            else:
                # Before Python 3.13 a snapshot of the locals taken earlier (pytest's assertion rewriting takes one)
                # survives clear(); reading f_locals again syncs it with the now empty frame.
                _ = tb.tb_frame.f_locals
            tb = tb.tb_next
        raise
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _float64_sum_of_squares(x: torch.Tensor, y: torch.Tensor | None = None, weight_decay: float = 0.0) -> float:
    """sum((x + weight_decay * y)**2) over the whole layer in float64, a slice at a time."""
    total = 0.0
    for start in range(0, x.numel(), SUM_CHUNK):
        part = x[start:start + SUM_CHUNK].double()
        if y is not None:
            part = part + weight_decay * y[start:start + SUM_CHUNK].double()
        total += float(part.square().sum())
    return total


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tvlars_step_on_a_layer_beyond_two_to_the_31_elements(backend):
    """One TVLARS step of a bfloat16 layer of 2**31 + 2**20 + 3 random elements: at sampled elements (both
    sides of 2**31, the last, and 4096 drawn at random) the float32 momentum and the new weights equal the spec
    computed in float64 with the whole layer's float64 norms."""
    backend_or_skip(backend, "cuda")
    free, _ = torch.cuda.mem_get_info()
    if free < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES / 2 ** 30:.0f} GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    with cuda_memory_released():
        _check_step_beyond_two_to_the_31(backend)


def _check_step_beyond_two_to_the_31(backend: str) -> None:
    lr, weight_decay, eta, lmbda = 100.0, 1e-2, 1e-3, 1e-3
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(NUMEL, generator=gen, device="cuda", dtype=torch.bfloat16)
    p.grad = torch.randn(NUMEL, generator=gen, device="cuda", dtype=torch.bfloat16).mul_(0.1)
    edges = torch.tensor([0, 1, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, NUMEL - 2, NUMEL - 1])
    drawn = torch.randint(0, NUMEL, (4096,), generator=torch.Generator().manual_seed(1))
    index = torch.cat([edges, drawn]).cuda()
    w = p[index].double()
    d = p.grad[index].double() + weight_decay * w
    w_norm = math.sqrt(_float64_sum_of_squares(p))
    d_norm = math.sqrt(_float64_sum_of_squares(p.grad, p, weight_decay))
    q = eta * phi(1, lmbda) * w_norm / d_norm  # the first step: t = 1, momentum buffer = q * d

    opt = TVLARS([p], lr=lr, weight_decay=weight_decay, eta=eta, lmbda=lmbda, exclude=None, backend=backend)
    opt.step()
    torch.cuda.synchronize()
    assert opt.state[p]["step"].item() == 1.0
    # float32 arithmetic on the sampled elements: a few ulps of q * d (d itself may cancel to near 0).
    torch.testing.assert_close(opt.state[p]["momentum_buffer"][index].double(), q * d, rtol=1e-5, atol=1e-6 * q)
    # The new weight is rounded once to bfloat16: within one bfloat16 ulp (2**-7 relative) of the float64 value.
    torch.testing.assert_close(p[index].double(), w - lr * q * d, rtol=2 ** -7, atol=1e-5)
