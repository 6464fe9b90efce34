"""Buckets made by hand, for the tests that call a backend's step functions directly."""

import torch

from tvlars_fused._types import Bucket


def make_bucket(shapes, *, lamb=False, dtype=torch.float32, masters=False, seed=0, grad_factor=1.0, device="cpu"):
    """Random layers with small random state, step counts 0, 1, 2, ... and 1-D layers excluded."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * grad_factor).to(device=device, dtype=dtype) for s in shapes]
    return Bucket(
        params=params,
        grads=grads,
        states=[[(torch.rand(s, generator=gen) * 0.01).to(device) for s in shapes] for _ in range(1 + lamb)],
        steps=[torch.tensor(float(i % 3), device=device) for i in range(len(shapes))],
        excluded=[len(s) <= 1 for s in shapes],
        masters=[p.float() for p in params] if masters else None,
    )


def clone_bucket(bucket, device=None):
    """A copy of every tensor of the bucket (on ``device`` when given)."""
    copy = (lambda t: t.clone()) if device is None else (lambda t: t.to(device, copy=True))
    return Bucket(
        params=[copy(t) for t in bucket.params],
        grads=[copy(t) for t in bucket.grads],
        states=[[copy(t) for t in s] for s in bucket.states],
        steps=[copy(t) for t in bucket.steps],
        excluded=list(bucket.excluded),
        masters=None if bucket.masters is None else [copy(t) for t in bucket.masters],
    )


def bucket_tensors(bucket, grads=True):
    tensors = bucket.params + bucket.steps + [t for s in bucket.states for t in s] + (bucket.masters or [])
    return tensors + (bucket.grads if grads else [])


def assert_buckets_close(bucket, expected, tol):
    for got, want in zip(bucket_tensors(bucket), bucket_tensors(expected)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def assert_buckets_equal(bucket, expected, grads=True):
    for got, want in zip(bucket_tensors(bucket, grads), bucket_tensors(expected, grads)):
        assert torch.equal(got, want)
