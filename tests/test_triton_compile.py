"""The Triton kernels compiled for real GPUs on a machine without one.

The interpreter (which runs the other Triton tests on the CPU) forgives things the compiler does not: types
of loop bounds, int-to-pointer casts, constexpr dtypes; and it says nothing of the machine code. So each
kernel is compiled here to a cubin for Hopper (the H200 test machine) and Ampere, with every constexpr flag
both ways, in a subprocess without TRITON_INTERPRET; no GPU or driver is needed for that. The PTX is then
read for what the design promises:

- no atomics: the reductions are deterministic;
- no approximate arithmetic in any kernel, as in the CUDA kernel (tests/test_cuda_ptx.py): no ``sqrt.approx``
  (it flushes sums below 2**-126 to zero; norms are float64, LAMB's sqrt is rounded), no ``div.full`` (what
  Triton makes of a float32 ``/``), no ``ex2.approx`` (``tl.exp``) nor any other ``.approx`` form;
- a layer whose tensors are 16-byte aligned has its element loops load and store 16 bytes per access
  (``ld.global.v4`` / ``st.global.v4``: four float32 or eight bfloat16): alone with ALL_ALIGNED, and as one of
  two branches chosen per layer without it, the other with no vector access at all (those fault on a
  misaligned address): the per-layer kernel has exactly the vector accesses of the ALL_ALIGNED one;
- a group that adapts no layer (ADAPT False) has pass 1 of LARS read no element at all (it only counts the step);
- bfloat16 state (stochastic or nearest) and Kahan-compensated weights: their columns take the vector path too
  (eight bfloat16 per 16-byte access), and the hash is integer arithmetic, nothing approximate;
- the runtime chunk size: the launches of two buckets of different layer sizes share one compiled kernel, and
  so do those of different seeds (0, 1, 2**32 - 1: the seed is a runtime int32, never specialized).

Either script also runs outside pytest (``python -c``) under another Triton, with the repository on
PYTHONPATH: the GPU machine runs another Triton than this one.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_ALL = textwrap.dedent("""
    import json, re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tvlars_fused.triton_kernels.common import layer_sums_kernel
    from tvlars_fused.triton_kernels.lamb import lamb_moments_kernel, lamb_update_kernel
    from tvlars_fused.triton_kernels.lars import lars_norms_kernel, lars_update_kernel

    TYPES = {"layers_ptr": "*i64", "chunk_layer_ptr": "*i32", "num_chunks": "i32", "chunk_size": "i32",
             "partials_ptr": "*fp64", "sums_ptr": "*fp64", "layer_sums_ptr": "*fp64", "seed": "i32"}

    def signature(fn, constexprs):
        return {name: "constexpr" if name in constexprs else TYPES.get(name, "*fp32" if name.endswith("_ptr")
                else "fp32") for name in fn.arg_names}

    results = []
    FLOAT32_STATE = dict(STATE_DTYPE=tl.float32, STOCHASTIC=False, KAHAN=False)
    for arch in (90, 80):
        # (flag, parameter dtype, storage): float32 state; bfloat16 state rounded stochastically (float32 and float16
        # parameters) or to nearest with Kahan-compensated bfloat16 weights
        for flag, dtype, storage in [
                (False, tl.float32, FLOAT32_STATE), (True, tl.bfloat16, FLOAT32_STATE),
                (True, tl.float16, dict(STATE_DTYPE=tl.bfloat16, STOCHASTIC=True, KAHAN=False)),
                (False, tl.bfloat16, dict(STATE_DTYPE=tl.bfloat16, STOCHASTIC=False, KAHAN=True)),
                (False, tl.float32, dict(STATE_DTYPE=tl.bfloat16, STOCHASTIC=True, KAHAN=False))]:
            common = dict(PARAM_DTYPE=dtype, HAS_MASTER=flag, BLOCK=1024, **storage)
            # A group that adapts no layer (ADAPT False) only with LAYER_SUMS, where pass 2 reduces no partials
            # anyway; the trust-ratio options (TRUST_CLIP, DECOUPLED_DECAY) both ways, the one with ADAPT.
            variants = [
                (lars_norms_kernel, dict(HAS_GRAD_SCALE=flag, SUM_OF_NORMS=flag, ADAPT=not flag)),
                (lars_update_kernel, dict(HAS_GRAD_SCALE=flag, LR_ON_DEVICE=not flag, SUM_OF_NORMS=not flag,
                                          NESTEROV=flag, USE_PHI=not flag, ADAPT=not flag,
                                          TRUST_CLIP=dtype != tl.bfloat16, RBLOCK=64 if flag else 1024,
                                          LAYER_SUMS=flag)),
                (lamb_moments_kernel, dict(HAS_GRAD_SCALE=not flag, HAS_CLIP_COEF=flag, BIAS_CORRECTION=flag,
                                           DECOUPLED_DECAY=dtype == tl.float16)),
                (lamb_update_kernel, dict(LR_ON_DEVICE=flag, BIAS_CORRECTION=not flag,
                                          DECOUPLED_DECAY=dtype == tl.float16, ADAPT=flag,
                                          RBLOCK=64 if flag else 1024, LAYER_SUMS=not flag)),
            ]
            # Ampere only checks that the code compiles: the PTX checks run on Hopper, both alignments.
            variants = [(fn, dict(flags, ALL_ALIGNED=aligned)) for fn, flags in variants
                        for aligned in ((True, False) if arch == 90 else (flag,))]
            variants.append((layer_sums_kernel, dict(RBLOCK=64 if flag else 1024)))
            for fn, flags in variants:
                # layer_sums_kernel has none of the elementwise flags
                constexprs = {k: v for k, v in dict(common, **flags).items() if k in fn.arg_names}
                kernel = triton.compile(ASTSource(fn, signature(fn, constexprs), constexprs),
                                        target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
                ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
                layouts = dict(re.findall(r"(?m)^(#\\w+) = (.*)$", ttgir))
                ops = set(re.findall(r"(?m)^\\s*(?:@!?%\\w+\\s+)?([a-z][\\w.:]*)", ptx))
                results.append(dict(
                    name=fn.__name__, arch=arch, dtype=str(dtype), flag=flag, aligned=flags.get("ALL_ALIGNED"),
                    state=str(storage["STATE_DTYPE"]) if "STATE_DTYPE" in constexprs else None,
                    stochastic=constexprs.get("STOCHASTIC", False), kahan=constexprs.get("KAHAN", False),
                    adapt=flags.get("ADAPT", True),
                    cubin=len(kernel.asm["cubin"]), atomics=re.search(r"\\b(atom|red)\\.", ptx) is not None,
                    approximate=sorted(op for op in ops if re.search(r"\\.(approx|full)\\b", op)),
                    sqrt=sorted(set(re.findall(r"\\bsqrt\\.[\\w.]+", ptx))),
                    global_access=sorted(set(re.findall(r"\\b(?:ld|st)\\.global(?:\\.\\w+)*", ptx))),
                    vector_accesses=len(re.findall(r"\\b(?:ld|st)\\.global(?:\\.\\w+)*\\.v[24]\\.", ptx)),
                    # 16-bit element accesses outside the predicated tail tile: a full tile's that did not
                    # become a vector access
                    unpredicated_16bit=len(re.findall(r"(?m)^\\s*(?:ld|st)\\.global\\.b16", ptx)),
                    # each float64 tile reduction's size and layout, which fix its order of additions
                    f64_reduces=[(int(n), layouts[name]) for n, name in re.findall(
                        r"tt\\.reduce.*?\\) : \\(tensor<(\\d+)xf64, (#\\w+)>", ttgir, re.S)]))
    json.dump(dict(triton=triton.__version__, results=results), sys.stdout)
""")

# Compile keys of the launches of two buckets, one of small layers and one of a large layer (chunks of 4096
# and 65536 elements, and differently many chunks), taken by Triton's own launcher in front of a stand-in
# driver (a Hopper target, no device); the launcher's compile hook records each key and skips the compile.
CACHE_KEYS = textwrap.dedent("""
    import json, sys
    import torch
    import triton, triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from tvlars_fused._triton_backend import _seed_bits, launch_sizes
    from tvlars_fused.triton_kernels.common import layer_sums_kernel
    from tvlars_fused.triton_kernels.lamb import lamb_moments_kernel, lamb_update_kernel
    from tvlars_fused.triton_kernels.lars import lars_norms_kernel, lars_update_kernel

    class Hopper:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Hopper())
    keys = {}

    def record(*, key, fn, **kwargs):
        keys.setdefault(fn.name, set()).add(str(key))
        return True  # do not compile

    knobs.runtime.jit_cache_hook = record
    ptr, f64 = torch.float32, torch.float64
    chunks = []
    for layers in ([1000, 70000, 3], [1 << 28]):
        bucket = type("Bucket", (), dict(params=[torch.empty(n, device="meta") for n in layers],
                                         device=torch.device("cuda"), cache={}))
        sizes = launch_sizes(bucket)
        num_chunks = sum(-(-n // sizes.chunk) for n in layers)
        chunks.append(sizes.chunk)
        lengths = dict(num_chunks=num_chunks, chunk_size=sizes.chunk)
        flags = dict(PARAM_DTYPE=tl.float32, HAS_MASTER=False, KAHAN=False, ALL_ALIGNED=True, BLOCK=sizes.block,
                     num_warps=sizes.num_warps)
        grid = (num_chunks,)
        lars_norms_kernel.warmup(torch.int64, torch.int32, f64, ptr, ptr, *lengths.values(), 0.0,
                                 HAS_GRAD_SCALE=False, SUM_OF_NORMS=False, ADAPT=True, grid=grid, **flags)
        state = dict(STATE_DTYPE=tl.bfloat16, STOCHASTIC=True)
        for seed in (0, 1, _seed_bits(2**32 - 1)):
            lars_update_kernel.warmup(torch.int64, torch.int32, f64, ptr, ptr, ptr, ptr, *lengths.values(), seed,
                                      *[0.5] * 13, HAS_GRAD_SCALE=False, LR_ON_DEVICE=False, SUM_OF_NORMS=False,
                                      NESTEROV=False, USE_PHI=True, ADAPT=True, TRUST_CLIP=False,
                                      RBLOCK=sizes.reduce_block, LAYER_SUMS=False, grid=grid, **state, **flags)
            lamb_moments_kernel.warmup(torch.int64, torch.int32, f64, ptr, ptr, ptr, ptr, *lengths.values(), seed,
                                       *[0.5] * 8, HAS_GRAD_SCALE=False, HAS_CLIP_COEF=False,
                                       BIAS_CORRECTION=True, DECOUPLED_DECAY=False, grid=grid, **state, **flags)
        lamb_update_kernel.warmup(torch.int64, torch.int32, f64, ptr, ptr, ptr, *lengths.values(), *[0.5] * 8,
                                  LR_ON_DEVICE=False, BIAS_CORRECTION=True, DECOUPLED_DECAY=False, ADAPT=True,
                                  RBLOCK=sizes.reduce_block, LAYER_SUMS=True, grid=grid, STATE_DTYPE=tl.bfloat16,
                                  **flags)
        layer_sums_kernel.warmup(torch.int64, f64, f64, num_chunks, RBLOCK=sizes.reduce_block,
                                 num_warps=sizes.num_warps, grid=(len(layers),))
    json.dump(dict(chunks=chunks, keys={name: len(k) for name, k in keys.items()}), sys.stdout)
""")


def _run(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip(f"this Triton install cannot compile for CUDA without a GPU: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_kernels_compile_for_hopper_and_ampere(tmp_path):
    results = _run(COMPILE_ALL, tmp_path)["results"]
    assert len(results) == 5 * (8 + 1) + 5 * (4 + 1)  # Hopper: both alignments; Ampere: one
    for r in results:
        assert r["cubin"] > 0, r
        assert not r["atomics"], r
        assert not r["approximate"], r
        assert not any(s.startswith("sqrt.approx") for s in r["sqrt"]), r
        if r["name"].endswith("_update_kernel") and r["adapt"]:  # else every q = 1: no norm is taken
            assert "sqrt.rn.f64" in r["sqrt"], r
    hopper = [r for r in results if r["arch"] == 90 and r["aligned"] is not None]
    all_aligned = {(r["name"], r["dtype"], r["flag"], r["state"]): r for r in hopper if r["aligned"]}
    for r in hopper:
        if r["name"] == "lars_norms_kernel" and not r["adapt"]:
            # a group that adapts no layer: pass 1 only counts the step, reading no element
            assert r["vector_accesses"] == 0 and r["unpredicated_16bit"] == 0, r
            continue
        # the aligned layers' path, in both kernels
        vector = [a for a in r["global_access"] if ".v2" in a or ".v4" in a]
        assert any(a.startswith("ld.global.v4.") for a in vector), r
        if r["name"] != "lars_norms_kernel":  # the one kernel that stores no element
            assert any(a.startswith("st.global.v4.") for a in vector), r
        # the misaligned layers' branch adds no vector access: one would fault on a misaligned address
        assert r["vector_accesses"] == all_aligned[r["name"], r["dtype"], r["flag"], r["state"]]["vector_accesses"], r
    # Pass 2 reduces a layer's partials with the tree layer_sums_kernel uses: the sharded step's bits.
    trees = {(r["arch"], n): layout for r in results if r["name"] == "layer_sums_kernel"
             for n, layout in r["f64_reduces"]}
    reducing = [r for r in results if r["name"].endswith("_update_kernel") and r["f64_reduces"]]
    assert len(reducing) == 15, reducing  # without LAYER_SUMS: 10 on Hopper (both alignments), 5 on Ampere
    for r in reducing:
        assert all(layout == trees[r["arch"], n] for n, layout in r["f64_reduces"]), r
    # bfloat16 and float16 elements: eight per 16-byte access when aligned (ld/st.global.v4.b32), and the
    # misaligned layers' branch has the unpredicated 16-bit accesses that the count would see if they were not
    # (bfloat16 state: the state's columns, in the kernels that read the state; Kahan: the compensation's, in
    # both passes)
    for r in hopper:
        sixteen_bit = r["dtype"] in ("bf16", "fp16") or r["state"] == "bf16" or r["kahan"]
        if sixteen_bit and (r["name"] != "lars_norms_kernel" or r["adapt"]):
            assert (r["unpredicated_16bit"] == 0) == r["aligned"], r
    # the kernels that store bfloat16 state stochastically do, and only they
    stochastic = {(r["name"], r["dtype"]) for r in results if r["stochastic"]}
    assert stochastic == {("lars_update_kernel", "fp16"), ("lars_update_kernel", "fp32"),
                          ("lamb_moments_kernel", "fp16"), ("lamb_moments_kernel", "fp32")}, stochastic


def test_runtime_chunk_size_compiles_one_kernel_for_every_bucket(tmp_path):
    measured = _run(CACHE_KEYS, tmp_path)
    assert measured["chunks"] == [4096, 65536]  # two layer-size classes
    assert measured["keys"] == {name: 1 for name in ("lars_norms_kernel", "lars_update_kernel",
                                                     "lamb_moments_kernel", "lamb_update_kernel",
                                                     "layer_sums_kernel")}, measured
