// The CUDA implementation of the tvlars_fused ops: one persistent cooperative kernel launch per step.
//
// The grid is at most as large as the number of blocks that can be co-resident, so cooperative_groups'
// grid.sync() is a valid barrier between three phases:
//   1. blocks stride over the chunks and write each chunk's partial sums of squares (float64) to the
//      workspace;
//   2. one warp per layer reduces that layer's partials in chunk order (lane-strided, then a fixed shuffle
//      tree: no atomics, so results are bit-reproducible), advances the step count once and writes the
//      trust ratio (and the new step count) to the workspace;
//   3. blocks stride over the chunks again and apply the update.
// LAMB orders its data dependency the same way: phase 1 updates and stores the moments m, v and sums w^2 and
// u^2 (u from the fresh moments); phase 2 turns the layer's sums into q = ||w|| / ||u||; phase 3 reads m, v
// and w again, recomputes u (bit-identical: same float32 inputs, same code) and writes w - lr*q*u. Gradients
// are only read, never overwritten. With found_inf set every block returns before the first barrier, so
// nothing at all is written. A split step (StepPhase, for sharded layers) runs phases 1 and 2 only, phase 2
// storing the layer's sums instead of using them, or takes the sums as given and runs phases 2 and 3 only.
//
// Memory access: each chunk reads its layer's row once into registers; the element loops move 16-byte packs
// (8 bfloat16/float16 or 4 float32 elements), kPerThread elements per thread per iteration, all loads of an
// iteration in flight before its stores. Layers whose tensors are not all 16-byte aligned (views into flat
// buffers) take a coalesced element-by-element path, chosen per layer. tests/test_cuda_ptx.py checks the PTX.
//
// bfloat16 state and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9): the kernels are
// instantiated per parameter dtype, weight source (the parameter, its float32 master, or the parameter plus its
// bfloat16 compensation) and state dtype. bfloat16 state moves in 16-byte packs like bfloat16 parameters; each new
// state value is rounded in registers (stochastically from the counter-based stream, or to nearest) and the step
// continues with the rounded value, which its store then converts exactly.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "build_marker.h"
#include "layer_table.h"
#include "optimizer_math.h"
#include "step_inputs.h"
#include "step_ops.h"

namespace cg = cooperative_groups;

namespace tvlars {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks per SM the kernels are compiled for (at most 85 registers a thread): 24 warps of 16-byte loads in
// flight, without register spills (ptxas -v, sm_90, nvcc 13.0: 64-80 registers, no spills; at 4 blocks
// some instantiations spill).
constexpr int kMinBlocksPerSm = 3;
// Elements one thread has in flight per loop iteration of the vector path: two 16-byte packs of float32
// parameters, one of bfloat16/float16 ones (with their float32 state in two 16-byte accesses), per tensor.
constexpr int kPerThread = 8;
constexpr int64_t kTile = int64_t{kThreads} * kPerThread;  // elements a block covers per vector iteration
// The element-by-element path takes fewer per thread: its masks and 64-bit indices cost registers.
constexpr int kMaskedPerThread = 4;

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kPackElems = 16 / sizeof(T);

// Consecutive elements of one group of a thread's vector tile: a 16-byte pack of the narrowest tensor the step moves
// (8 when the parameters or the state are 16-bit), so that every tensor moves in whole 16-byte packs (float32 ones
// in two).
template <typename scalar_t, bool kBf16State>
constexpr int kGroupElems = sizeof(scalar_t) == 2 || kBf16State ? 8 : 4;

struct DeviceTable {
  const int64_t* rows;  // 16-byte aligned (checked on the host)
  const int32_t* chunk_layer;
  int64_t num_layers;
  int64_t num_chunks;
  int64_t chunk_size;
  bool chunk_packs;        // chunk_size is a multiple of kGroupElems: every chunk starts on a group
  double* chunk_partials;  // [num_chunks][2]
  double* layer_results;   // [num_layers][2]: trust ratio, new step count
  int64_t phase;           // StepPhase
  double* layer_sums;      // [num_layers][2]: written by PHASE_SUMS, read by PHASE_APPLY; else nullptr
};

// Optional device scalars, read in-kernel so that a captured CUDA graph replays with their current values.
struct DeviceScalars {
  const float* lr;          // nullptr: use the hyper-parameter's lr
  const float* grad_scale;  // nullptr: 1
  const float* found_inf;   // nullptr: 0
  const float* clip_coef;   // nullptr: 1 (LAMB only)
};

// One layer's row in registers. Read once per chunk through the read-only path (a step never writes the
// table), so that no store in the element loops can make the compiler read it again.
struct Row {
  int64_t col[NUM_COLS];
};

static_assert(NUM_COLS % 2 == 0, "read_row loads the row in 16-byte pairs");

__device__ __forceinline__ Row read_row(const int64_t* __restrict__ rows, int64_t layer) {
  Row row;
  const longlong2* src = reinterpret_cast<const longlong2*>(rows + layer * NUM_COLS);
#pragma unroll
  for (int k = 0; k < NUM_COLS / 2; ++k) {
    const longlong2 pair = __ldg(src + k);
    row.col[2 * k] = pair.x;
    row.col[2 * k + 1] = pair.y;
  }
  return row;
}

__device__ __forceinline__ Row chunk_row(const DeviceTable& tab, int64_t chunk) {
  return read_row(tab.rows, __ldg(tab.chunk_layer + chunk));
}

// 16-byte accesses need every tensor of the layer 16-byte aligned (and chunks starting on a pack).
__device__ __forceinline__ bool packable(const DeviceTable& tab, const Row& row) {
  const int64_t bits = row.col[COL_PARAM] | row.col[COL_GRAD] | row.col[COL_STATE0] | row.col[COL_STATE1] |
                       row.col[COL_MASTER] | row.col[COL_COMP];
  return tab.chunk_packs && (bits & 15) == 0;
}

// Where one thread's elements of one loop iteration lie: kGroups groups of kElems consecutive elements, group
// k starting at first + k * stride. kVec: whole 16-byte packs, all inside the chunk; otherwise element by
// element, masked by `end`.
template <bool kVecT, int kGroupsT, int kElemsT>
struct Slots {
  static constexpr bool kVec = kVecT;
  static constexpr int kGroups = kGroupsT;
  static constexpr int kElems = kElemsT;
  int64_t first;
  int64_t stride;
  int64_t end;
  __device__ __forceinline__ int64_t at(int k, int j) const { return first + k * stride + j; }
  __device__ __forceinline__ bool valid(int k, int j) const { return kVec || at(k, j) < end; }
};

template <typename S>
using Values = float[S::kGroups][S::kElems];

// The tensors' addresses come from the table as integers, so the compiler cannot know they are global memory
// and would emit generic accesses; every access to the tensors (16-byte packs, single elements, step counts) is
// therefore written with the ld.global/st.global intrinsics. __ldg (ld.global.nc) is the non-coherent read-only
// path, only for data no thread writes during the kernel (gradients); the rest bypass L1 (ld/st.global.cg:
// streamed once per phase, and never stale after a grid.sync). The intrinsics are inline assembly, kept in
// program order: a tile issues all its loads before it computes and stores.
//
// kElems consecutive elements from a 16-byte aligned address, as float32.
template <int kElems, bool kReadOnly, typename T>
__device__ __forceinline__ void load_packs(const T* p, float (&out)[kElems]) {
  constexpr int kPer = kPackElems<T>;
  static_assert(kElems % kPer == 0, "a group is whole 16-byte packs");
#pragma unroll
  for (int k = 0; k < kElems / kPer; ++k) {
    const uint4* src = reinterpret_cast<const uint4*>(p) + k;
    const uint4 raw = kReadOnly ? __ldg(src) : __ldcg(src);
    T v[kPer];
    memcpy(v, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k * kPer + j] = static_cast<float>(v[j]);
  }
}

// Stores kElems float32 values to a 16-byte aligned address, rounding each once to T.
template <int kElems, typename T>
__device__ __forceinline__ void store_packs(T* p, const float (&in)[kElems]) {
  constexpr int kPer = kPackElems<T>;
  static_assert(kElems % kPer == 0, "a group is whole 16-byte packs");
#pragma unroll
  for (int k = 0; k < kElems / kPer; ++k) {
    T v[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[j] = static_cast<T>(in[k * kPer + j]);
    uint4 raw;
    memcpy(&raw, v, sizeof(raw));
    __stcg(reinterpret_cast<uint4*>(p) + k, raw);
  }
}

// One element, for the element-by-element path: the same global accesses and cache policy as the packs (a plain
// `p[i]` would compile to a generic access). 16-bit types move as their raw bits.
template <bool kReadOnly, typename T>
__device__ __forceinline__ float load_one(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return kReadOnly ? __ldg(p) : __ldcg(p);
  } else {
    static_assert(sizeof(T) == 2, "parameters are float32, bfloat16 or float16");
    const unsigned short* src = reinterpret_cast<const unsigned short*>(p);
    const unsigned short raw = kReadOnly ? __ldg(src) : __ldcg(src);
    T v;
    memcpy(&v, &raw, sizeof(raw));
    return static_cast<float>(v);
  }
}

// Stores one float32 value, rounded once to T.
template <typename T>
__device__ __forceinline__ void store_one(T* p, float x) {
  if constexpr (std::is_same_v<T, float>) {
    __stcg(p, x);
  } else {
    const T v = static_cast<T>(x);
    unsigned short raw;
    memcpy(&raw, &v, sizeof(raw));
    __stcg(reinterpret_cast<unsigned short*>(p), raw);
  }
}

// A thread's elements of one iteration as float32 (zeros where masked off).
template <bool kReadOnly = false, typename T, typename S>
__device__ __forceinline__ void load(const T* p, const S& s, Values<S>& out) {
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
    if constexpr (S::kVec) {
      load_packs<S::kElems, kReadOnly>(p + s.at(k, 0), out[k]);
    } else {
#pragma unroll
      for (int j = 0; j < S::kElems; ++j) out[k][j] = s.valid(k, j) ? load_one<kReadOnly>(p + s.at(k, j)) : 0.0f;
    }
  }
}

template <typename T, typename S>
__device__ __forceinline__ void store(T* p, const S& s, const Values<S>& in) {
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
    if constexpr (S::kVec) {
      store_packs<S::kElems>(p + s.at(k, 0), in[k]);
    } else {
#pragma unroll
      for (int j = 0; j < S::kElems; ++j) {
        if (s.valid(k, j)) store_one(p + s.at(k, j), in[k][j]);
      }
    }
  }
}

// Calls tile(slots) until the chunk's elements are covered: whole tiles of 16-byte packs when `vec`, then
// element by element (consecutive threads on consecutive elements, so still coalesced) for the chunk's last,
// partial tile, or for the whole chunk of a layer that is not packable.
template <int kElems, typename Tile>
__device__ __forceinline__ void for_each_tile(ElementRange r, bool vec, Tile&& tile) {
  int64_t i = r.begin;
  if (vec) {
    for (; i + kTile <= r.end; i += kTile) {
      tile(Slots<true, kPerThread / kElems, kElems>{i + threadIdx.x * kElems, int64_t{kThreads} * kElems, r.end});
    }
  }
  for (; i < r.end; i += int64_t{kThreads} * kMaskedPerThread) {
    tile(Slots<false, kMaskedPerThread, 1>{i + threadIdx.x, kThreads, r.end});
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the block in a fixed order; thread 0 holds the totals.
__device__ __forceinline__ void block_sum2(double& a, double& b, double (&scratch)[2][kWarps]) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    scratch[0][warp] = a;
    scratch[1][warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    b = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a += scratch[0][w];
      b += scratch[1][w];
    }
  }
  __syncthreads();  // scratch is reused by the block's next chunk
}

// Phase 2 for both optimizers: one warp per layer sums the layer's chunk partials in a fixed order (PHASE_APPLY:
// takes the given whole-layer sums instead), then lane 0 stores the sums (PHASE_SUMS) or advances the step
// count (its only write) and stores ratio(first, second, t, flags) and t.
template <typename Ratio>
__device__ __forceinline__ void reduce_layers(const DeviceTable& tab, Ratio ratio) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  for (int64_t layer = first_warp; layer < tab.num_layers; layer += static_cast<int64_t>(gridDim.x) * kWarps) {
    const Row row = read_row(tab.rows, layer);
    double first = 0.0, second = 0.0;
    if (tab.phase == PHASE_APPLY) {
      first = tab.layer_sums[2 * layer];
      second = tab.layer_sums[2 * layer + 1];
    } else {
      const int64_t end = row.col[COL_FIRST_CHUNK] + row.col[COL_NUM_CHUNKS];
      for (int64_t c = row.col[COL_FIRST_CHUNK] + lane; c < end; c += 32) {
        first += tab.chunk_partials[2 * c];
        second += tab.chunk_partials[2 * c + 1];
      }
      first = warp_sum(first);
      second = warp_sum(second);
    }
    if (lane == 0 && tab.phase == PHASE_SUMS) {
      tab.layer_sums[2 * layer] = first;
      tab.layer_sums[2 * layer + 1] = second;
    } else if (lane == 0) {
      float* step = column_ptr<float>(row.col, COL_STEP);
      const float t = __ldcg(step) + 1.0f;
      __stcg(step, t);
      tab.layer_results[2 * layer] = ratio(first, second, t, row.col[COL_FLAGS]);
      tab.layer_results[2 * layer + 1] = t;
    }
  }
}

// Phase 3 visits the chunks in reverse: phase 1 ended on the highest chunks, so the first ones re-read here
// may still be in L2 (not measurable on the CPU-only development machines).
__device__ __forceinline__ int64_t reversed_chunk(const DeviceTable& tab, int64_t k) {
  return tab.num_chunks - 1 - k;
}

// The tensor the step reads the weights from: the float32 master when there is one, else the parameter (with a Kahan
// compensation, the parameter plus its compensation).
template <int kSource>
constexpr int kWeightCol = kSource == kMasterWeights ? COL_MASTER : COL_PARAM;

// ---------------------------------------------------------------- weights and state of a tile
//
// The tile functions take each tensor as a parameter, __restrict__ where it is written: a store through one
// cannot change another. (Every access is an ld/st.global intrinsic, kept in program order, so each tile's
// loads are issued ahead of its stores by how the tile is written, on both paths.)
// Weights and moments are not `const __restrict__` where only read: they are written in another phase of the
// same kernel, so they must never be loaded through the non-coherent read-only path, which a compiler may
// choose for such pointers (nvcc 13.0 does not here; only gradients take it, explicitly).

// A tile's float32 weights: the master or the parameter, plus the Kahan compensation when there is one (the sum is
// exact in float32, docs/algorithms.md section 9).
template <int kSource, typename S, typename scalar_t, typename weight_t>
__device__ __forceinline__ void load_weights(const S& s, const weight_t* w_in, const scalar_t* comp_in, Values<S>& w) {
  load(w_in, s, w);
  if constexpr (kSource == kKahanWeights) {
    Values<S> comp;
    load(comp_in, s, comp);
#pragma unroll
    for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
      for (int j = 0; j < S::kElems; ++j) w[k][j] += comp[k][j];
    }
  }
}

// Stores a tile's new weights: into w_io (the master, then rounded into param_out; or the parameter); with a Kahan
// compensation, as the parameter's nearest bfloat16 and the nearest bfloat16 of the rest (kahan_split: values of
// the two bfloat16 tensors, so their stores' conversions are exact).
template <int kSource, typename S, typename scalar_t, typename weight_t>
__device__ __forceinline__ void store_weights(const S& s, weight_t* __restrict__ w_io, scalar_t* __restrict__ param_out,
                                              scalar_t* __restrict__ comp_out, Values<S>& w) {
  if constexpr (kSource == kKahanWeights) {
    Values<S> comp;
#pragma unroll
    for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
      for (int j = 0; j < S::kElems; ++j) {
        const KahanSplit split = kahan_split(w[k][j]);
        w[k][j] = bf16_bits_to_float(split.param);
        comp[k][j] = bf16_bits_to_float(split.comp);
      }
    }
    store(w_io, s, w);
    store(comp_out, s, comp);
  } else {
    store(w_io, s, w);
    if constexpr (kSource == kMasterWeights) store(param_out, s, w);
  }
}

// The value a state element holds once stored, which the step continues with: x itself in float32 state; in
// bfloat16 state x rounded stochastically from the stream (`base`, the element's index in the whole layer) or to
// nearest, as a float32 value (its store's conversion to bfloat16 is then exact).
template <bool kBf16State, typename S>
__device__ __forceinline__ float stored_state(float x, const StateRounding& r, uint32_t base, const S& s, int k,
                                              int j) {
  if constexpr (kBf16State) {
    return bf16_stored_value(x, r.stochastic, base, r.offset + s.at(k, j));
  } else {
    return x;
  }
}

// How this step stores the layer's bfloat16 state: its streams' bases for the new step count t.
__device__ __forceinline__ StateRounding row_rounding(const Row& row, bool stochastic, uint32_t seed, float t) {
  return state_rounding(stochastic, seed, row.col[COL_LAYER_ID], row.col[COL_ELEMENT_OFFSET], t);
}

// ---------------------------------------------------------------- LARS family

template <int kSource, typename S, typename scalar_t, typename weight_t>
__device__ __forceinline__ void lars_sums_tile(const S& s, const weight_t* w_in, const scalar_t* comp_in,
                                               const scalar_t* __restrict__ g_in, const LarsHyper& h,
                                               float grad_scale, bool no_decay, double& w_sq, double& denom_sq) {
  Values<S> w, g;
  load_weights<kSource>(s, w_in, comp_in, w);
  load<true>(g_in, s, g);
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
    for (int j = 0; j < S::kElems; ++j) {
      if (!s.valid(k, j)) continue;
      const float gj = effective_grad(g[k][j], grad_scale, 1.0f);
      const float term =
          lars_denominator_term(gj, lars_decayed_grad(gj, w[k][j], h.weight_decay, no_decay), h.sum_of_norms);
      w_sq += square(w[k][j]);
      denom_sq += square(term);
    }
  }
}

// w_io: the master weights (then param_out receives the rounded copy) or the parameter itself (with comp_io its
// Kahan compensation). The buffer is stored first (rounded, for bfloat16 state), and the weight's update uses the
// stored buffer.
template <int kSource, bool kBf16State, typename S, typename scalar_t, typename weight_t, typename state_t>
__device__ __forceinline__ void lars_apply_tile(const S& s, weight_t* __restrict__ w_io,
                                                scalar_t* __restrict__ param_out, scalar_t* __restrict__ comp_io,
                                                const scalar_t* __restrict__ g_in, state_t* __restrict__ buf_io,
                                                const LarsHyper& h, float grad_scale, float lr, float q,
                                                bool no_decay, bool first, const StateRounding& rounding) {
  Values<S> w, g, buf;
  load_weights<kSource>(s, w_io, comp_io, w);
  load<true>(g_in, s, g);
  load(buf_io, s, buf);
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
    for (int j = 0; j < S::kElems; ++j) {
      const float d = lars_decayed_grad(effective_grad(g[k][j], grad_scale, 1.0f), w[k][j], h.weight_decay,
                                        no_decay);
      const float u = q * d;
      buf[k][j] = stored_state<kBf16State>(lars_momentum(h, u, first, buf[k][j]), rounding, rounding.base0, s, k, j);
      w[k][j] = lars_new_weight(h, h.nesterov, lr, u, buf[k][j], w[k][j]);
    }
  }
  store(buf_io, s, buf);
  store_weights<kSource>(s, w_io, param_out, comp_io, w);
}

template <typename scalar_t, int kSource, bool kBf16State>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lars_step_kernel(DeviceTable tab, LarsHyper h, DeviceScalars s) {
  using weight_t = std::conditional_t<kSource == kMasterWeights, float, scalar_t>;
  using state_t = std::conditional_t<kBf16State, c10::BFloat16, float>;
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;  // every block leaves before any barrier
  cg::grid_group grid = cg::this_grid();
  __shared__ double scratch[2][kWarps];
  const float grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;

  // Phase 1, skipped by PHASE_APPLY (as is its barrier: the phase is the same in every block).
  for (int64_t c = blockIdx.x; c < tab.num_chunks && tab.phase != PHASE_APPLY; c += gridDim.x) {
    const Row row = chunk_row(tab, c);
    double w_sq = 0.0, denom_sq = 0.0;
    if (layer_adapted(h.adapt, row.col[COL_FLAGS])) {  // layers without a trust ratio have nothing to sum
      const weight_t* w_in = column_ptr<const weight_t>(row.col, kWeightCol<kSource>);
      const scalar_t* comp_in = column_ptr<const scalar_t>(row.col, COL_COMP);
      const scalar_t* g_in = column_ptr<const scalar_t>(row.col, COL_GRAD);
      const bool no_decay = row.col[COL_FLAGS] & FLAG_NO_DECAY;
      for_each_tile<kGroupElems<scalar_t, kBf16State>>(
          chunk_elements(row.col, c, tab.chunk_size), packable(tab, row), [&](const auto& sl) {
            lars_sums_tile<kSource>(sl, w_in, comp_in, g_in, h, grad_scale, no_decay, w_sq, denom_sq);
          });
    }
    block_sum2(w_sq, denom_sq, scratch);
    if (threadIdx.x == 0) {
      tab.chunk_partials[2 * c] = w_sq;
      tab.chunk_partials[2 * c + 1] = denom_sq;
    }
  }
  if (tab.phase != PHASE_APPLY) grid.sync();

  // The lr, read once for phases 2 (LARC's clip) and 3.
  const float lr = s.lr != nullptr ? *s.lr : h.lr;
  reduce_layers(tab, [&](double w_sq, double denom_sq, float t, int64_t flags) {
    return lars_trust_ratio(h, w_sq, denom_sq, t, lr, layer_decay(h.weight_decay, flags),
                            layer_adapted(h.adapt, flags));
  });
  if (tab.phase == PHASE_SUMS) return;  // every block: no barrier follows
  grid.sync();

  for (int64_t k = blockIdx.x; k < tab.num_chunks; k += gridDim.x) {
    const int64_t c = reversed_chunk(tab, k);
    const int64_t layer = __ldg(tab.chunk_layer + c);
    const Row row = read_row(tab.rows, layer);
    const float q = static_cast<float>(tab.layer_results[2 * layer]);  // a float32 value, stored exactly
    const float t = static_cast<float>(tab.layer_results[2 * layer + 1]);  // the new step count
    const bool first = t == 1.0f;  // the layer's first step: buf = u
    const bool no_decay = row.col[COL_FLAGS] & FLAG_NO_DECAY;
    const StateRounding rounding = row_rounding(row, h.stochastic_rounding, h.seed, t);
    weight_t* w_io = column_ptr<weight_t>(row.col, kWeightCol<kSource>);
    scalar_t* param_out = column_ptr<scalar_t>(row.col, COL_PARAM);
    scalar_t* comp_io = column_ptr<scalar_t>(row.col, COL_COMP);
    const scalar_t* g_in = column_ptr<const scalar_t>(row.col, COL_GRAD);
    state_t* buf_io = column_ptr<state_t>(row.col, COL_STATE0);
    for_each_tile<kGroupElems<scalar_t, kBf16State>>(
        chunk_elements(row.col, c, tab.chunk_size), packable(tab, row), [&](const auto& sl) {
          lars_apply_tile<kSource, kBf16State>(sl, w_io, param_out, comp_io, g_in, buf_io, h, grad_scale, lr, q,
                                               no_decay, first, rounding);
        });
  }
}

// ---------------------------------------------------------------- LAMB

struct BiasCorrections {
  float first;
  float second;
};

__device__ __forceinline__ BiasCorrections bias_corrections(const LambHyper& h, float t) {
  if (!h.bias_correction) return {1.0f, 1.0f};
  return {bias_correction(t, h.log_beta1), bias_correction(t, h.log_beta2)};
}

// The moments are stored (rounded, for bfloat16 state) and u is formed from the stored values.
template <int kSource, bool kBf16State, typename S, typename scalar_t, typename weight_t, typename state_t>
__device__ __forceinline__ void lamb_moments_tile(const S& s, const weight_t* w_in, const scalar_t* comp_in,
                                                  const scalar_t* __restrict__ g_in, state_t* __restrict__ m_io,
                                                  state_t* __restrict__ v_io, const LambHyper& h, float grad_scale,
                                                  float grad_mult, BiasCorrections bc, float decay,
                                                  const StateRounding& rounding, double& w_sq, double& u_sq) {
  Values<S> w, g, m, v;
  load_weights<kSource>(s, w_in, comp_in, w);
  load<true>(g_in, s, g);
  load(m_io, s, m);
  load(v_io, s, v);
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
    for (int j = 0; j < S::kElems; ++j) {
      if (!s.valid(k, j)) continue;
      lamb_moments(h, effective_grad(g[k][j], grad_scale, grad_mult), m[k][j], v[k][j]);
      m[k][j] = stored_state<kBf16State>(m[k][j], rounding, rounding.base0, s, k, j);
      v[k][j] = stored_state<kBf16State>(v[k][j], rounding, rounding.base1, s, k, j);
      const float u = lamb_update(m[k][j], v[k][j], w[k][j], bc.first, bc.second, h.eps, decay);
      w_sq += square(w[k][j]);
      u_sq += square(u);
    }
  }
  store(m_io, s, m);
  store(v_io, s, v);
}

template <int kSource, typename S, typename scalar_t, typename weight_t, typename state_t>
__device__ __forceinline__ void lamb_apply_tile(const S& s, weight_t* __restrict__ w_io,
                                                scalar_t* __restrict__ param_out, scalar_t* __restrict__ comp_io,
                                                const state_t* m_in, const state_t* v_in, const LambHyper& h,
                                                BiasCorrections bc, float decay, float keep, float lr_q) {
  Values<S> w, m, v;
  load_weights<kSource>(s, w_io, comp_io, w);
  load(m_in, s, m);
  load(v_in, s, v);
#pragma unroll
  for (int k = 0; k < S::kGroups; ++k) {
#pragma unroll
    for (int j = 0; j < S::kElems; ++j) {
      w[k][j] = lamb_apply(keep, w[k][j], lr_q,
                           lamb_update(m[k][j], v[k][j], w[k][j], bc.first, bc.second, h.eps, decay));
    }
  }
  store_weights<kSource>(s, w_io, param_out, comp_io, w);
}

template <typename scalar_t, int kSource, bool kBf16State>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lamb_step_kernel(DeviceTable tab, LambHyper h, DeviceScalars s) {
  using weight_t = std::conditional_t<kSource == kMasterWeights, float, scalar_t>;
  using state_t = std::conditional_t<kBf16State, c10::BFloat16, float>;
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;  // every block leaves before any barrier
  cg::grid_group grid = cg::this_grid();
  __shared__ double scratch[2][kWarps];
  const float grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;
  const float grad_mult = s.clip_coef != nullptr ? *s.clip_coef : 1.0f;

  // Phase 1: moments, then sums of w^2 and u^2. The step count is read here (t = old + 1) and written only
  // in phase 2, after the barrier (by PHASE_APPLY's call). Skipped by PHASE_APPLY, as is its barrier.
  for (int64_t c = blockIdx.x; c < tab.num_chunks && tab.phase != PHASE_APPLY; c += gridDim.x) {
    const Row row = chunk_row(tab, c);
    const float decay = lamb_update_decay(h, layer_decay(h.weight_decay, row.col[COL_FLAGS]));
    const float t = __ldcg(column_ptr<const float>(row.col, COL_STEP)) + 1.0f;
    const BiasCorrections bc = bias_corrections(h, t);
    const StateRounding rounding = row_rounding(row, h.stochastic_rounding, h.seed, t);
    const weight_t* w_in = column_ptr<const weight_t>(row.col, kWeightCol<kSource>);
    const scalar_t* comp_in = column_ptr<const scalar_t>(row.col, COL_COMP);
    const scalar_t* g_in = column_ptr<const scalar_t>(row.col, COL_GRAD);
    state_t* m_io = column_ptr<state_t>(row.col, COL_STATE0);
    state_t* v_io = column_ptr<state_t>(row.col, COL_STATE1);
    double w_sq = 0.0, u_sq = 0.0;
    for_each_tile<kGroupElems<scalar_t, kBf16State>>(
        chunk_elements(row.col, c, tab.chunk_size), packable(tab, row), [&](const auto& sl) {
          lamb_moments_tile<kSource, kBf16State>(sl, w_in, comp_in, g_in, m_io, v_io, h, grad_scale, grad_mult, bc,
                                                 decay, rounding, w_sq, u_sq);
        });
    block_sum2(w_sq, u_sq, scratch);
    if (threadIdx.x == 0) {
      tab.chunk_partials[2 * c] = w_sq;
      tab.chunk_partials[2 * c + 1] = u_sq;
    }
  }
  if (tab.phase != PHASE_APPLY) grid.sync();

  // The lr, read once for phases 2 (the decoupled decay's ||w||) and 3.
  const float lr = s.lr != nullptr ? *s.lr : h.lr;
  reduce_layers(tab, [&](double w_sq, double u_sq, float, int64_t flags) {
    return lamb_trust_ratio(h, w_sq, u_sq, lr, layer_decay(h.weight_decay, flags), layer_adapted(h.adapt, flags));
  });
  if (tab.phase == PHASE_SUMS) return;  // every block: no barrier follows
  grid.sync();

  // Phase 3: u again from the stored moments, then w = keep*w - lr*q*u (keep: the decoupled decay's 1 - lr*beta').
  for (int64_t k = blockIdx.x; k < tab.num_chunks; k += gridDim.x) {
    const int64_t c = reversed_chunk(tab, k);
    const int64_t layer = __ldg(tab.chunk_layer + c);
    const Row row = read_row(tab.rows, layer);
    const float lr_q = lr * static_cast<float>(tab.layer_results[2 * layer]);
    const BiasCorrections bc = bias_corrections(h, static_cast<float>(tab.layer_results[2 * layer + 1]));
    const float layer_beta = layer_decay(h.weight_decay, row.col[COL_FLAGS]);
    const float decay = lamb_update_decay(h, layer_beta);
    const float keep = lamb_weight_keep(h, lr, layer_beta);
    weight_t* w_io = column_ptr<weight_t>(row.col, kWeightCol<kSource>);
    scalar_t* param_out = column_ptr<scalar_t>(row.col, COL_PARAM);
    scalar_t* comp_io = column_ptr<scalar_t>(row.col, COL_COMP);
    const state_t* m_in = column_ptr<const state_t>(row.col, COL_STATE0);
    const state_t* v_in = column_ptr<const state_t>(row.col, COL_STATE1);
    for_each_tile<kGroupElems<scalar_t, kBf16State>>(
        chunk_elements(row.col, c, tab.chunk_size), packable(tab, row), [&](const auto& sl) {
          lamb_apply_tile<kSource>(sl, w_io, param_out, comp_io, m_in, v_in, h, bc, decay, keep, lr_q);
        });
  }
}

// ---------------------------------------------------------------- launch

// resident_blocks' answers, per kernel instantiation and device; 0: not queried yet.
template <auto kKernel>
std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> resident_cache{};

// How many blocks of kKernel can be co-resident on `device` (the largest grid for which grid.sync() is valid).
// Queried once per kernel instantiation and device: a step must not pay for the occupancy calculator.
template <auto kKernel>
int resident_blocks(int device) {
  auto& cache = resident_cache<kKernel>;
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "tvlars_fused: CUDA device index ", device,
              " is out of range");
  int blocks = cache[device].load(std::memory_order_relaxed);
  if (blocks > 0) return blocks;
  int cooperative = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(cooperative, "tvlars_fused: CUDA device ", device, " does not support cooperative launches");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0));
  TORCH_CHECK(per_sm > 0, "tvlars_fused: the step kernel cannot be resident on device ", device);
  blocks = sms * per_sm;
  cache[device].store(blocks, std::memory_order_relaxed);  // racing threads store the same value
  return blocks;
}

// A cooperative launch refused because its grid cannot be co-resident (fewer blocks fit than the occupancy
// calculator said, e.g. under an MPS active-thread limit) fails every step alike. Its error starts with this
// marker, which tvlars_fused/_cpp_backend.py matches to step with another backend instead. Nothing ran: the
// launch was refused before any block started.
constexpr const char* kNotCoResident = "tvlars_fused: cooperative launch cannot be co-resident";

template <auto kKernel, typename Hyper>
void launch(DeviceTable tab, Hyper h, DeviceScalars s, int device, cudaStream_t stream) {
  const int grid = std::max(1, static_cast<int>(std::min<int64_t>(resident_blocks<kKernel>(device), tab.num_chunks)));
  void* args[] = {&tab, &h, &s};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kKernel), dim3(grid), dim3(kThreads), args, 0, stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // not a sticky error: clear it, so that no later check reports it again
    resident_cache<kKernel>[device].store(0, std::memory_order_relaxed);  // a later step queries again
    TORCH_CHECK(false, kNotCoResident, ": a grid of ", grid, " blocks of ", kThreads, " threads on CUDA device ",
                device, " (", cudaGetErrorString(err), ")");
  }
  C10_CUDA_CHECK(err);
}

// The device rows the kernel walks: the table, or (list form, when functionalization handed the op copies of
// the table's tensors) the fresh rows uploaded from pinned memory without blocking the host (graph-safe: no
// pageable copy, no synchronisation). The caching allocators keep the staging and the device copy alive until
// the stream has used them.
at::Tensor device_rows(const StepArgs& args) {
  if (!args.fresh_rows) return args.layers;
  at::Tensor rows = at::empty_like(args.layers);
  rows.copy_(args.rows_host.pin_memory(), /*non_blocking=*/true);
  return rows;
}

// The table, chunk map, workspace and layer_sums were allocated on the stream current when the table was built,
// which need not be the stream this step runs on. Recording the use keeps the caching allocator from handing
// their memory to that other stream while this launch may still read it. The allocator ignores uses on the
// allocating stream (and tensors it does not own), so this costs a lookup per tensor and never synchronises.
void record_use(const at::Tensor& t, c10::cuda::CUDAStream stream) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

// layer_sums is not part of StepArgs (only its pointer is), so the op entry points record it.
void record_layer_sums(const std::optional<at::Tensor>& layer_sums) {
  if (layer_sums.has_value()) record_use(*layer_sums, c10::cuda::getCurrentCUDAStream(layer_sums->get_device()));
}

// What a launch needs besides the kernel: the device, its current stream and the rows to walk.
struct LaunchContext {
  explicit LaunchContext(const StepArgs& args)
      : guard(args.device), stream(c10::cuda::getCurrentCUDAStream(args.device.index())) {
    for (const at::Tensor* t : {&args.layers, &args.chunk_layer, &args.workspace}) record_use(*t, stream);
    rows = device_rows(args);
  }
  const c10::cuda::CUDAGuard guard;
  const c10::cuda::CUDAStream stream;
  at::Tensor rows;
};

template <typename scalar_t, bool kBf16State>
DeviceTable device_table(const StepArgs& args, const at::Tensor& rows) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 == 0,
              "tvlars_fused: the layer table `layers` must be 16-byte aligned");
  return {rows.data_ptr<int64_t>(), args.chunk_layer.data_ptr<int32_t>(), args.num_layers, args.num_chunks,
          args.chunk_size, args.chunk_size % kGroupElems<scalar_t, kBf16State> == 0, args.chunk_partials,
          args.layer_results,
          args.phase, args.layer_sums};
}

DeviceScalars device_scalars(const StepArgs& args) {
  return {args.lr, args.grad_scale, args.found_inf, args.clip_coef};
}

}  // namespace

// The launches behind both op forms.
void lars_run_cuda(const StepArgs& args, const LarsHyper& h) {
  const LaunchContext ctx(args);
  dispatch_step(args, [&](auto scalar, auto source, auto bf16_state) {
    using scalar_t = decltype(scalar);
    constexpr bool kBf16State = decltype(bf16_state)::value;
    launch<lars_step_kernel<scalar_t, decltype(source)::value, kBf16State>>(
        device_table<scalar_t, kBf16State>(args, ctx.rows), h, device_scalars(args), args.device.index(),
        ctx.stream.stream());
  });
}

void lamb_run_cuda(const StepArgs& args, const LambHyper& h) {
  const LaunchContext ctx(args);
  dispatch_step(args, [&](auto scalar, auto source, auto bf16_state) {
    using scalar_t = decltype(scalar);
    constexpr bool kBf16State = decltype(bf16_state)::value;
    launch<lamb_step_kernel<scalar_t, decltype(source)::value, kBf16State>>(
        device_table<scalar_t, kBf16State>(args, ctx.rows), h, device_scalars(args), args.device.index(),
        ctx.stream.stream());
  });
}

void lars_step_cuda(TVLARS_LARS_STEP_ARGS) {
  const StepArgs args = TVLARS_LARS_LIST_CHECKED("lars_step");
  record_layer_sums(layer_sums);
  lars_run_cuda(args, TVLARS_LARS_HYPER("lars_step"));
}

void lamb_step_cuda(TVLARS_LAMB_STEP_ARGS) {
  const StepArgs args = TVLARS_LAMB_LIST_CHECKED("lamb_step");
  record_layer_sums(layer_sums);
  lamb_run_cuda(args, TVLARS_LAMB_HYPER("lamb_step"));
}

void lars_step_table_cuda(TVLARS_LARS_TABLE_ARGS) {
  const StepArgs args = TVLARS_LARS_TABLE_CHECKED("lars_step_table");
  record_layer_sums(layer_sums);
  lars_run_cuda(args, TVLARS_LARS_HYPER("lars_step_table"));
}

void lamb_step_table_cuda(TVLARS_LAMB_TABLE_ARGS) {
  const StepArgs args = TVLARS_LAMB_TABLE_CHECKED("lamb_step_table");
  record_layer_sums(layer_sums);
  lamb_run_cuda(args, TVLARS_LAMB_HYPER("lamb_step_table"));
}

}  // namespace tvlars

TORCH_LIBRARY_IMPL(tvlars_fused, CUDA, m) {
  m.impl("lars_step", &tvlars::lars_step_cuda);
  m.impl("lamb_step", &tvlars::lamb_step_cuda);
  m.impl("lars_step_table", &tvlars::lars_step_table_cuda);
  m.impl("lamb_step_table", &tvlars::lamb_step_table_cuda);
}
