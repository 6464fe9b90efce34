// The layer table of tvlars_fused/_layer_table.py, column for column, and how a chunk maps to elements.
//
// Row i of the int64 table describes layer i; layer i owns chunks [first_chunk, first_chunk + num_chunks)
// and chunk c covers its elements [(c - first_chunk) * chunk_size, min(numel, that + chunk_size)). A layer of
// 0 elements owns one empty chunk. Every size and offset is int64, so layers above 2^31 elements work.
#pragma once

#include <cstdint>

#include "optimizer_math.h"  // TVLARS_HD

namespace tvlars {

enum LayerColumn : int {
  COL_PARAM = 0,
  COL_GRAD = 1,
  COL_STATE0 = 2,  // LARS: momentum buffer; LAMB: exp_avg
  COL_STATE1 = 3,  // LAMB: exp_avg_sq; 0 for LARS
  COL_MASTER = 4,  // float32 master weight, 0 when none
  COL_STEP = 5,    // float32 0-dim step count
  COL_NUMEL = 6,
  COL_FIRST_CHUNK = 7,
  COL_NUM_CHUNKS = 8,
  COL_FLAGS = 9,
  COL_COMP = 10,            // bfloat16 Kahan compensation of a bfloat16 parameter, 0 when none
  COL_LAYER_ID = 11,        // the layer's number in the stochastic-rounding stream (docs/algorithms.md section 9)
  COL_ELEMENT_OFFSET = 12,  // the index in the whole layer of this tensor's first element (a shard's offset)
  COL_PADDING = 13,         // 0: a row is a whole number of 16-byte pairs (the CUDA kernel's row loads)
  NUM_COLS = 14,
};

// The flags column: per-layer bits, as tvlars_fused/_layer_table.py sets them (its FLAG_ALIGNED16 = 2 is for the
// Triton kernels; the CUDA kernel checks alignment from the addresses).
constexpr int64_t FLAG_NO_DECAY = 1;  // beta' = 0
constexpr int64_t FLAG_NO_ADAPT = 4;  // q = 1

// The weight decay beta' of a layer: 0 for a layer without weight decay.
TVLARS_HD float layer_decay(float weight_decay, int64_t flags) {
  return (flags & FLAG_NO_DECAY) ? 0.0f : weight_decay;
}

// Whether a layer takes a trust ratio: the group adapts and the layer is not excluded from adaptation.
TVLARS_HD bool layer_adapted(bool adapt, int64_t flags) {
  return adapt && !(flags & FLAG_NO_ADAPT);
}

struct ElementRange {
  int64_t begin;
  int64_t end;  // begin == end for the empty chunk of an empty layer
};

TVLARS_HD ElementRange chunk_elements(int64_t numel, int64_t first_chunk, int64_t chunk, int64_t chunk_size) {
  const int64_t begin = (chunk - first_chunk) * chunk_size;
  const int64_t end = begin + chunk_size < numel ? begin + chunk_size : numel;
  return {begin, end > begin ? end : begin};
}

TVLARS_HD ElementRange chunk_elements(const int64_t* row, int64_t chunk, int64_t chunk_size) {
  return chunk_elements(row[COL_NUMEL], row[COL_FIRST_CHUNK], chunk, chunk_size);
}

template <typename T>
TVLARS_HD T* column_ptr(const int64_t* row, int column) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(row[column]));
}

}  // namespace tvlars
