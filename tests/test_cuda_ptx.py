"""The CUDA kernels' PTX, checked on a machine without a GPU.

csrc/cuda_step.cu is compiled once per session to PTX for sm_90 (the H200 test machine) with the flags the
extension build passes, split into its kernel instantiations, and each is checked for what the design
promises and a GPU run would only show as speed or drift:
- the element loops use 16-byte accesses: each tensor of a tile in kPerThread * itemsize / 16 `ld/st.global
  .v4` of the exact count the design gives, gradients (and of the float data only they) through the
  read-only path `.nc` (weights and moments are written in another phase of the same kernel, so `.nc` loads
  of them could be stale);
- the element-by-element path (layers that are not 16-byte aligned, chunk tails) and the step counts use global
  accesses too: the tensors' addresses come from the layer table as integers, so plain C++ accesses would compile
  to generic ones (LD.E/ST.E in SASS, which resolve the state space at run time). Its scalar accesses have exact
  counts as well, gradients again the only float data read through `.nc`;
- no atomics besides the two grid barriers' integer counters: the norm reductions have a fixed order;
- square roots and divisions are correctly rounded (`sqrt.rn`, `div.rn`, never `.approx`/`.full`), and
  the norm path takes its square roots in float64 (the float64 norms of docs/algorithms.md);
- nothing lives in local memory (register arrays indexed at run time or spilled rows would), and ptxas, assembling
  the PTX for sm_90 under the kernels' launch bounds, spills nothing and needs no stack frame.

The kernels are instantiated per parameter dtype, weight source (the parameter; its float32 master; a bfloat16
parameter plus its bfloat16 Kahan compensation) and state dtype (float32 or bfloat16, docs/algorithms.md section 9):
bfloat16 state and the compensation move in 16-byte packs like bfloat16 parameters, and their element path in 16-bit
words, with the counts the design gives; the stochastic rounding's hash is integer arithmetic in registers.
"""

import collections
import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tvlars_fused import _extension

SOURCE = _extension.CSRC / "cuda_step.cu"
ARCH = "sm_90"

DTYPES = {"f": ("float32", 4), "N3c108BFloat16E": ("bfloat16", 2), "N3c104HalfE": ("float16", 2)}
ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", re.M)
# <parameter dtype, weight source (WeightSource in csrc/step_inputs.h), bfloat16 state>
KERNEL_NAME = re.compile(r"(lars|lamb)_step_kernelI(f|N3c108BFloat16E|N3c104HalfE)Li([012])ELb([01])E")
SOURCES = {"0": "params", "1": "master", "2": "kahan"}
INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", re.M)
ATOMIC = re.compile(r"^(atom|red)\.")
STATE_SPACE = re.compile(r"\.(global|shared|param|local|const)\b")
# A scalar access to float data: float32, or a 16-bit parameter's raw bits.
SCALAR_FLOAT_ACCESS = re.compile(r"(ld|st)\.global(\.nc)?(\.[a-z]+)*\.(f32|[bu]16)")


def _nvcc_command(out: Path) -> list[str]:
    """nvcc to PTX with what torch.utils.cpp_extension and tvlars_fused/_extension.py pass for a build."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: no CUDA headers to compile against")
    home = _extension.cuda_home()
    if home is None:
        pytest.skip("nvcc not found: put it on PATH or set CUDA_HOME")
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()  # torch's own headers; nvcc adds the CUDA toolkit's
    if not any((Path(d) / "c10" / "cuda" / "CUDAStream.h").exists() for d in includes):
        pytest.skip("torch's CUDA headers (c10/cuda/CUDAStream.h) are missing")
    # the standard the extension build uses: C++20 where torch's build passes it, else C++17
    std = "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"
    return ([str(Path(home) / "bin" / "nvcc"), "--ptx", f"-arch={ARCH}", std, *cpp_extension.COMMON_NVCC_FLAGS,
             *_extension.nvcc_flags(jit=False), *(f"-I{d}" for d in includes), str(SOURCE), "-o", str(out)])


@pytest.fixture(scope="module")
def ptx_file(tmp_path_factory) -> Path:
    """csrc/cuda_step.cu compiled to PTX, once per session."""
    out = tmp_path_factory.mktemp("ptx") / "cuda_step.ptx"
    command = _nvcc_command(out)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"nvcc failed:\n{' '.join(command)}\n{done.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def kernels(ptx_file) -> dict[tuple[str, str, str, bool], str]:
    """{(optimizer, dtype name, weight source, bfloat16 state): that kernel's PTX}."""
    ptx = ptx_file.read_text()
    starts = list(ENTRY.finditer(ptx))
    found = {}
    for k, entry in enumerate(starts):
        name = KERNEL_NAME.search(entry.group(1))
        assert name is not None, f"unexpected kernel {entry.group(1)}"
        body = ptx[entry.start():starts[k + 1].start() if k + 1 < len(starts) else len(ptx)]
        found[(name.group(1), DTYPES[name.group(2)][0], SOURCES[name.group(3)], name.group(4) == "1")] = body
    return found


def per_thread() -> int:
    """kPerThread of the source: elements per thread per iteration of the vector path."""
    return int(re.search(r"constexpr int kPerThread = (\d+);", SOURCE.read_text()).group(1))


def masked_per_thread() -> int:
    """kMaskedPerThread of the source: elements per thread per iteration of the element-by-element path."""
    return int(re.search(r"constexpr int kMaskedPerThread = (\d+);", SOURCE.read_text()).group(1))


def instructions(body: str) -> collections.Counter:
    return collections.Counter(INSTRUCTION.findall(body))


def expected_accesses(optimizer: str, itemsize: int, source: str, bf16_state: bool) -> tuple[int, int, int]:
    """(16-byte read-only loads, other 16-byte loads, 16-byte stores) of one instantiation's tiles.

    LARS reads w and g to sum their squares, then w, g and the momentum buffer to apply; LAMB reads w, g, m, v
    and stores m, v, then reads w, m, v again. The update stores w, and the rounded parameter when w is the
    float32 master. With a Kahan compensation every read of w is a read of the parameter and its compensation, and
    the update stores both. A tensor of 16-bit elements (parameters, bfloat16 state, the compensation) moves a tile in
    half the 16-byte accesses of a float32 one."""
    per = per_thread()
    state = per * (2 if bf16_state else 4) // 16  # a state tensor's 16-byte accesses per tile
    param = per * itemsize // 16
    w = per * 4 // 16 if source == "master" else param
    if source == "kahan":
        w += param  # the compensation, bfloat16 as the parameter
    if optimizer == "lars":
        grads = 2 * param
        loads = w + (w + state)
        stores = state + w
    else:
        grads = param
        loads = (w + 2 * state) + (w + 2 * state)
        stores = 2 * state + w
    return grads, loads, stores + (param if source == "master" else 0)


INSTANTIATIONS = [(opt, dtype, source, bf16_state) for opt in ("lars", "lamb") for bf16_state in (False, True)
                  for dtype, source in (("float32", "params"), ("bfloat16", "params"), ("bfloat16", "master"),
                                        ("bfloat16", "kahan"), ("float16", "params"), ("float16", "master"))]
IDS = [f"{opt}-{dtype}-{source}-{'bf16' if bf16_state else 'f32'}-state"
       for opt, dtype, source, bf16_state in INSTANTIATIONS]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def test_every_instantiation_is_compiled(kernels):
    assert sorted(kernels) == sorted(INSTANTIATIONS)


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_element_loops_use_16_byte_accesses(kernels, key):
    optimizer, dtype, source, bf16_state = key
    ops = instructions(kernels[key])
    read_only = sum(n for op, n in ops.items() if re.fullmatch(r"ld\.global\.nc(\.[\w:]+)*\.v4\.\w32", op))
    loads = sum(n for op, n in ops.items() if re.fullmatch(r"ld\.global(?!\.nc)(\.[\w:]+)*\.v4\.\w32", op))
    stores = sum(n for op, n in ops.items() if re.fullmatch(r"st\.global(\.[\w:]+)*\.v4\.\w32", op))
    want = expected_accesses(optimizer, ITEMSIZE[dtype], source, bf16_state)
    assert (read_only, loads, stores) == want, (
        f"(read-only gradient loads, other loads, stores) of 16 bytes: got {(read_only, loads, stores)}, the "
        f"design gives {want}; all 16-byte accesses: { {op: n for op, n in ops.items() if '.v4' in op} }")
    # the read-only path's other loads: the element path's gradients (test_element_path_uses_global_accesses)
    # and the layer table and chunk map (integers)
    other_read_only = {op: n for op, n in ops.items() if op.startswith("ld.global.nc") and ".v4." not in op
                       and not re.search(r"\.[us](32|64)$", op) and not SCALAR_FLOAT_ACCESS.fullmatch(op)}
    assert not other_read_only, other_read_only


def expected_element_accesses(optimizer: str, dtype: str, source: str, bf16_state: bool) -> collections.Counter:
    """{(read-only load / load / store, "f32" or "16"): count} of one instantiation's scalar float accesses.

    The element-by-element tiles touch the tensors that the 16-byte tiles do (expected_accesses), one element of
    each per thread kMaskedPerThread times; 16-bit tensors (parameters, bfloat16 state, the compensation) move as raw
    16-bit words. Besides the tiles: the step count is loaded and stored once per layer (LAMB loads it again in phase
    1 for the bias corrections and the rounding stream), and the device scalars (lr, grad_scale, found_inf, LAMB's
    clip coefficient) are loaded once each."""
    param = "f32" if dtype == "float32" else "16"
    state = "16" if bf16_state else "f32"
    w = ["f32"] if source == "master" else [param, param] if source == "kahan" else [param]
    if optimizer == "lars":
        grads, reads, writes, step_loads, scalars = 2, w + w + [state], [state] + w, 1, 3
    else:
        grads, reads, writes, step_loads, scalars = 1, (w + [state, state]) * 2, [state, state] + w, 2, 4
    if source == "master":
        writes.append(param)  # the rounded parameter
    per = masked_per_thread()
    want = collections.Counter({("ld.nc", param): grads * per, ("ld", "f32"): step_loads + scalars, ("st", "f32"): 1})
    for kind, tensors in (("ld", reads), ("st", writes)):
        for t in tensors:
            want[(kind, t)] += per
    return want


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_element_path_uses_global_accesses(kernels, key):
    ops = instructions(kernels[key])
    # every access names its state space; generic ones are left only to the grid barrier's integer flag
    generic = {op: n for op, n in ops.items() if re.match(r"(ld|st)\.", op) and not STATE_SPACE.search(op)
               and not re.fullmatch(r"ld\.acquire\.gpu\.[bu]32", op)}
    assert not generic, f"generic loads/stores (LD.E/ST.E): {generic}"
    got = collections.Counter()
    for op, n in ops.items():
        match = SCALAR_FLOAT_ACCESS.fullmatch(op)
        if match:
            kind = "ld.nc" if match.group(2) else match.group(1)
            got[(kind, "f32" if match.group(4) == "f32" else "16")] += n
    want = expected_element_accesses(*key)
    assert got == want, f"scalar float accesses (kind, type): got {dict(got)}, the design gives {dict(want)}"


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_reductions_have_no_atomics(kernels, key):
    atomics = {op: n for op, n in instructions(kernels[key]).items() if ATOMIC.match(op)}
    # cooperative_groups' grid.sync() counts arrivals with one integer atomic; there are two barriers
    assert all(re.search(r"\.[us](32|64)$", op) for op in atomics) and sum(atomics.values()) <= 2, atomics


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_square_roots_and_divisions_are_correctly_rounded(kernels, key):
    ops = instructions(kernels[key])
    approximate = {op: n for op, n in ops.items() if re.match(r"(r?sqrt|div|rcp)\.(approx|full)", op)}
    assert not approximate, approximate
    assert ops["sqrt.rn.f64"] >= 2, "the norms' square roots must be float64 (||w|| and the denominator)"


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_no_local_memory(kernels, key):
    local = {op: n for op, n in instructions(kernels[key]).items() if re.match(r"(ld|st)\.local", op)}
    assert not local, local


def _ptxas_report(ptx_file: Path) -> str:
    ptxas = Path(_extension.cuda_home()) / "bin" / "ptxas"
    done = subprocess.run([str(ptxas), f"-arch={ARCH}", "-v", str(ptx_file), "-o", str(ptx_file.with_suffix(".cubin"))],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"ptxas failed:\n{done.stderr[-4000:]}"
    return done.stderr


@pytest.fixture(scope="module")
def ptxas_info(ptx_file) -> dict[tuple[str, str, str, bool], dict[str, int]]:
    """{instantiation: {"registers", "stack", "spill_stores", "spill_loads"}} from `ptxas -v` on the PTX: what the
    PTX alone cannot show (a register array spilled to local memory appears only once registers are allocated)."""
    report = _ptxas_report(ptx_file)
    info = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", report):
        name = KERNEL_NAME.search(block)
        if name is None or "Compiling entry function" not in block:
            continue
        key = (name.group(1), DTYPES[name.group(2)][0], SOURCES[name.group(3)], name.group(4) == "1")
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        assert frame and registers, block
        info[key] = dict(registers=int(registers.group(1)), stack=int(frame.group(1)),
                         spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
    return info


def test_ptxas_sees_every_instantiation(ptxas_info):
    assert sorted(ptxas_info) == sorted(INSTANTIATIONS)


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_no_register_spills(ptxas_info, key):
    """__launch_bounds__(kThreads, kMinBlocksPerSm) caps the registers (65536 / (256 * 3) = 85 a thread on sm_90);
    within that cap nothing may spill: the bfloat16 state's hash and the compensation's split add registers."""
    info = ptxas_info[key]
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0 and info["stack"] == 0, info
    assert info["registers"] <= 65536 // (256 * 3), info


def _as_s32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


# lowbias32's multipliers (csrc/optimizer_math.h, mix32), as PTX writes 32-bit immediates (signed or not).
MIX32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


@pytest.mark.parametrize("key", INSTANTIATIONS, ids=IDS)
def test_the_rounding_stream_is_compiled_where_the_state_is_bfloat16(kernels, key):
    """A bfloat16-state kernel hashes each element it stores (mix32's two multiplications, once per stored state
    tensor per tile and element slot; LARS stores one state, LAMB two), and a float32-state kernel draws no bits."""
    optimizer, _, _, bf16_state = key
    immediates = collections.Counter(int(m) for m in re.findall(r"mul\.lo\.[su]32\s+%r\d+,\s*%r\d+,\s*(-?\d+);",
                                                                 kernels[key]))
    counts = [sum(immediates[v] for v in {m, _as_s32(m)}) for m in MIX32_MULTIPLIERS]
    if not bf16_state:
        assert counts == [0, 0], counts
        return
    # each element slot of the vector tile and of the element-by-element tile hashes, at least
    slots = per_thread() + masked_per_thread()
    states = 1 if optimizer == "lars" else 2
    assert counts[0] == counts[1] and counts[0] >= states * slots, counts
