// Paged attention on the CPU, called from jitted code through XLA's FFI
// (folojax/ops/cpu_kernels.py compiles and registers it).
//
// It takes the same arrays as the gather loop in folojax/ops/paged_attention.py: queries as rows
// (a decode row, or a prefill tile of consecutive queries of one request), the paged cache of
// one layer, and work items (consecutive blocks of one row's keys each, from the host). Each
// (row, KV head) is one task: its queries walk the row's blocks once, straight from the cache
// (no gathered copy), with a running softmax (flash attention's online max and sum). Tasks are
// shared with the threads of XLA's own pool.
//
// A query sees the keys at positions <= its own; a query at position -1 (padding), or a row
// without items, gets zeros.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMasked = -1e30f;  // a masked score: exp(kMasked - max) is 0, and stays finite
constexpr int64_t kMaxHeadDim = 512, kMaxBlockSize = 256;  // shapes without a specialization
constexpr int64_t kLineFloats = 16;  // floats per cache line
// How far ahead a row's blocks are prefetched: measured, 1 ahead beat 2 and 4 (decode of 48
// rows, docs/BENCHMARKS.md).
constexpr int64_t kPrefetchBlocks = 1;

struct Shapes {
  int64_t rows, q_len, heads, kv_heads, groups, head_dim, num_blocks, block_size;
};

// Each row's blocks in key order, as offsets into one array (a counting sort of the items).
struct RowBlocks {
  std::vector<int64_t> begin;   // [rows + 1]
  std::vector<int32_t> blocks;  // block ids
  std::vector<int32_t> starts;  // position of each block's first key
};

RowBlocks CollectRowBlocks(const Shapes& s, const int32_t* item_rows, const int32_t* item_blocks,
                           const int32_t* item_starts, int64_t num_items,
                           int64_t blocks_per_item, const std::vector<int32_t>& last_position) {
  RowBlocks out;
  out.begin.assign(s.rows + 1, 0);
  auto visible = [&](int64_t item, int64_t b, int32_t row) {
    int64_t start = int64_t{item_starts[item]} + b * s.block_size;
    return start <= last_position[row];  // padding items start past every position
  };
  for (int64_t pass = 0; pass < 2; ++pass) {
    std::vector<int64_t> next(out.begin.begin(), out.begin.end() - 1);
    for (int64_t item = 0; item < num_items; ++item) {
      int32_t row = item_rows[item];
      if (row < 0 || row >= s.rows) continue;
      for (int64_t b = 0; b < blocks_per_item; ++b) {
        if (!visible(item, b, row)) continue;
        if (pass == 0) {
          ++out.begin[row + 1];
        } else {
          int32_t block = item_blocks[item * blocks_per_item + b];
          out.blocks[next[row]] = std::clamp<int32_t>(block, 0, s.num_blocks - 1);
          out.starts[next[row]] = item_starts[item] + b * s.block_size;
          ++next[row];
        }
      }
    }
    if (pass == 0) {
      for (int64_t r = 0; r < s.rows; ++r) out.begin[r + 1] += out.begin[r];
      out.blocks.resize(out.begin[s.rows]);
      out.starts.resize(out.begin[s.rows]);
    }
  }
  return out;
}

// Scratch of one task: its queries (scaled), their positions and running softmax state.
struct Scratch {
  std::vector<float> q, acc, scores, keys_t;
  std::vector<float> max, sum;
  std::vector<int32_t> position;
  std::vector<float*> destination;
};

// 8 floats, one AVX register (GCC/Clang vector extension: plain C++ operators, any target).
typedef float Vec __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// c [4, 16] = (accumulate ? c : 0) + a [4, k] x b [k, 16], rows of each `ld*` floats apart: the
// register tile of both products below (8 accumulators; each b row loaded serves 4 a rows).
inline void Tile4x16(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
                     float* c, int64_t ldc, bool accumulate) {
  Vec acc[4][2];
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t h = 0; h < 2; ++h)
      acc[r][h] = accumulate ? Load(c + r * ldc + h * kLanes) : Vec{};
  for (int64_t x = 0; x < k; ++x) {
    const Vec b0 = Load(b + x * ldb), b1 = Load(b + x * ldb + kLanes);
    for (int64_t r = 0; r < 4; ++r) {
      const float weight = a[r * lda + x];
      acc[r][0] += weight * b0;
      acc[r][1] += weight * b1;
    }
  }
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t h = 0; h < 2; ++h) Store(c + r * ldc + h * kLanes, acc[r][h]);
}

// scores [n, BS] = queries [n, D] x keys_t [D, BS] (the block's keys, transposed).
template <int64_t kD, int64_t kBS>
void ScoresTransposed(const Shapes& s, const float* queries, int64_t n, const float* keys_t,
                      float* scores) {
  const int64_t D = kD ? kD : s.head_dim, BS = kBS ? kBS : s.block_size;
  int64_t i = 0;
  if (BS == 16)
    for (; i + 4 <= n; i += 4) Tile4x16(queries + i * D, D, keys_t, BS, D, scores + i * BS, BS,
                                        false);
  for (; i < n; ++i) {
    float* row = scores + i * BS;
    for (int64_t key = 0; key < BS; ++key) row[key] = 0.0f;
    for (int64_t j = 0; j < D; ++j)
      for (int64_t key = 0; key < BS; ++key) row[key] += queries[i * D + j] * keys_t[j * BS + key];
  }
}

// scores [n, BS] = queries [n, D] . keys [BS, D], one dot product per (query, key): for a
// few queries (decode), where transposing the block would cost more than it saves.
template <int64_t kD, int64_t kBS>
void DotScores(const Shapes& s, const float* queries, int64_t n, const float* keys,
               float* scores) {
  const int64_t D = kD ? kD : s.head_dim, BS = kBS ? kBS : s.block_size;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t key = 0; key < BS; ++key) {
      float dot = 0.0f;
      if (D % kLanes == 0) {
        Vec sums{};
        for (int64_t j = 0; j < D; j += kLanes)
          sums += Load(queries + i * D + j) * Load(keys + key * D + j);
        for (int64_t lane = 0; lane < kLanes; ++lane) dot += sums[lane];
      } else {
        for (int64_t j = 0; j < D; ++j) dot += queries[i * D + j] * keys[key * D + j];
      }
      scores[i * BS + key] = dot;
    }
}

// acc [n, D] += probabilities [n, BS] x values [BS, D].
template <int64_t kD, int64_t kBS>
void AccumulateValues(const Shapes& s, const float* probabilities, int64_t n, const float* values,
                      float* acc) {
  const int64_t D = kD ? kD : s.head_dim, BS = kBS ? kBS : s.block_size;
  int64_t i = 0;
  if (D % 16 == 0)
    for (; i + 4 <= n; i += 4)
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        Tile4x16(probabilities + i * BS, BS, values + d0, D, BS, acc + i * D + d0, D, true);
  for (; i < n; ++i)
    for (int64_t key = 0; key < BS; ++key) {
      const float p = probabilities[i * BS + key];
      for (int64_t j = 0; j < D; ++j) acc[i * D + j] += p * values[key * D + j];
    }
}

// One (row, KV head): every visible query of the row for that head's query group. kD
// (head_dim) and kBS (block_size) are compile-time constants for the common shapes, so the
// inner loops unroll; 0 means the size is read from `s` (up to kMaxHeadDim, kMaxBlockSize).
template <int64_t kD, int64_t kBS>
void AttendTask(const Shapes& s, const float* q, const float* k_cache, const float* v_cache,
                const int32_t* positions, const RowBlocks& row_blocks, float* out, int64_t row,
                int64_t kv_head, Scratch& t) {
  const int64_t D = kD ? kD : s.head_dim, BS = kBS ? kBS : s.block_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t n = 0;
  const int64_t capacity = s.q_len * s.groups;
  t.q.resize(capacity * D);
  t.acc.assign(capacity * D, 0.0f);
  t.scores.resize(capacity * BS);
  t.keys_t.resize(D * BS);
  t.max.assign(capacity, kMasked);
  t.sum.assign(capacity, 0.0f);
  t.position.resize(capacity);
  t.destination.resize(capacity);
  int32_t furthest = -1, nearest = INT32_MAX;
  for (int64_t i = 0; i < s.q_len; ++i) {
    const int32_t position = positions[row * s.q_len + i];
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t offset = ((row * s.q_len + i) * s.heads + kv_head * s.groups + g) * D;
      if (position < 0) {
        std::memset(out + offset, 0, D * sizeof(float));
        continue;
      }
      for (int64_t j = 0; j < D; ++j) t.q[n * D + j] = q[offset + j] * scale;
      t.position[n] = position;
      t.destination[n] = out + offset;
      ++n;
      furthest = std::max(furthest, position);
      nearest = std::min(nearest, position);
    }
  }
  // Many queries per block (a prefill tile): transpose the block's keys once and compute all
  // queries' scores together; a few (decode): one dot product per key.
  const bool transpose = n > 8;
  // Where the keys (and values) of the row's index-th block start in the pool.
  auto slab_of = [&](int64_t index) {
    return (int64_t{row_blocks.blocks[index]} * s.kv_heads + kv_head) * BS * D;
  };
  for (int64_t index = row_blocks.begin[row]; index < row_blocks.begin[row + 1]; ++index) {
    const int32_t start = row_blocks.starts[index];
    if (start > furthest) continue;
    const int64_t slab = slab_of(index);
    const float* keys = k_cache + slab;
    const float* values = v_cache + slab;
    // The row's next block: its keys and values are on their way to L2 while this block
    // computes (blocks lie anywhere in the pool, so no hardware prefetcher follows them).
    if (index + kPrefetchBlocks < row_blocks.begin[row + 1]) {
      const int64_t ahead = slab_of(index + kPrefetchBlocks);
      for (int64_t offset = 0; offset < BS * D; offset += kLineFloats) {
        __builtin_prefetch(k_cache + ahead + offset, 0, 2);
        __builtin_prefetch(v_cache + ahead + offset, 0, 2);
      }
    }
    if (transpose) {
      for (int64_t key = 0; key < BS; ++key)
        for (int64_t j = 0; j < D; ++j) t.keys_t[j * BS + key] = keys[key * D + j];
      ScoresTransposed<kD, kBS>(s, t.q.data(), n, t.keys_t.data(), t.scores.data());
    } else {
      DotScores<kD, kBS>(s, t.q.data(), n, keys, t.scores.data());
    }
    // Softmax step per query: the block's probabilities (0 for keys it must not see) in
    // place of its scores, the running sum and the accumulator rescaled to the new max.
    const bool all_visible = start + BS - 1 <= nearest;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t position = t.position[i];
      float* scores = t.scores.data() + i * BS;
      if (position < start) {
        for (int64_t key = 0; key < BS; ++key) scores[key] = 0.0f;
        continue;
      }
      if (!all_visible)
        for (int64_t key = 0; key < BS; ++key)
          if (start + key > position) scores[key] = kMasked;
      float block_max = kMasked;
      for (int64_t key = 0; key < BS; ++key) block_max = std::max(block_max, scores[key]);
      if (block_max > t.max[i]) {
        const float correction = std::exp(t.max[i] - block_max);
        t.sum[i] *= correction;
        float* acc = t.acc.data() + i * D;
        for (int64_t j = 0; j < D; ++j) acc[j] *= correction;
        t.max[i] = block_max;
      }
      float sum = 0.0f;
      for (int64_t key = 0; key < BS; ++key) {
        scores[key] = std::exp(scores[key] - t.max[i]);
        sum += scores[key];
      }
      t.sum[i] += sum;
    }
    AccumulateValues<kD, kBS>(s, t.scores.data(), n, values, t.acc.data());
  }
  for (int64_t i = 0; i < n; ++i) {
    const float inverse = t.sum[i] > 0.0f ? 1.0f / t.sum[i] : 0.0f;  // no keys: zeros
    for (int64_t j = 0; j < D; ++j) t.destination[i][j] = t.acc[i * D + j] * inverse;
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                          ffi::Buffer<ffi::S32> item_rows, ffi::Buffer<ffi::S32> item_blocks,
                          ffi::Buffer<ffi::S32> item_starts,
                          ffi::Buffer<ffi::S32> query_positions,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions();
  const auto cache_dims = k_cache.dimensions();
  const auto block_dims = item_blocks.dimensions();
  if (q_dims.size() != 4 || cache_dims.size() != 4 || block_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "paged_attention: expected q [rows, q_len, heads, head_dim], caches [num_blocks, "
        "kv_heads, block_size, head_dim] and item blocks [items, blocks per item]");
  }
  Shapes s{q_dims[0], q_dims[1], q_dims[2], cache_dims[1], 0, q_dims[3], cache_dims[0],
           cache_dims[2]};
  if (s.kv_heads == 0 || s.heads % s.kv_heads != 0 || cache_dims[3] != s.head_dim) {
    return ffi::Error::InvalidArgument(
        "paged_attention: query heads must be a multiple of the cache's KV heads, with the "
        "same head_dim");
  }
  s.groups = s.heads / s.kv_heads;
  if (s.head_dim > kMaxHeadDim || s.block_size > kMaxBlockSize) {
    return ffi::Error::InvalidArgument("paged_attention: head_dim above 512 or block_size above "
                                       "256 (use the JAX path)");
  }
  const int32_t* positions = query_positions.typed_data();
  std::vector<int32_t> last_position(s.rows, -1);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t i = 0; i < s.q_len; ++i)
      last_position[r] = std::max(last_position[r], positions[r * s.q_len + i]);
  const RowBlocks row_blocks =
      CollectRowBlocks(s, item_rows.typed_data(), item_blocks.typed_data(),
                       item_starts.typed_data(), block_dims[0], block_dims[1], last_position);
  const float* q_data = q.typed_data();
  const float* k_data = k_cache.typed_data();
  const float* v_data = v_cache.typed_data();
  float* out_data = out->typed_data();
  auto run = [&](auto attend) {
    const int64_t num_tasks = s.rows * s.kv_heads;
    folojax::ParallelFor<Scratch>(pool, num_tasks, [&](int64_t task, Scratch& scratch) {
      attend(s, q_data, k_data, v_data, positions, row_blocks, out_data, task / s.kv_heads,
             task % s.kv_heads, scratch);
    });
  };
  if (s.head_dim == 64 && s.block_size == 16) {
    run(AttendTask<64, 16>);
  } else if (s.head_dim == 128 && s.block_size == 16) {
    run(AttendTask<128, 16>);
  } else {
    run(AttendTask<0, 0>);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item rows
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item blocks
                                  .Arg<ffi::Buffer<ffi::S32>>()  // item starts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query positions
                                  .Ret<ffi::Buffer<ffi::F32>>());
