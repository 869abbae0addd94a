// x @ w.T for a few rows of x, on the CPU, called from jitted code through XLA's FFI
// (folojax/ops/cpu_kernels.py compiles and registers it; folojax/model/layers.py calls it).
//
// Decode multiplies a handful of rows by every weight matrix, so its speed is the speed at which
// the weights stream from memory. XLA's CPU matmul of 2-16 rows reads them at about half the
// rate of its matrix-vector product of one (docs/BENCHMARKS.md); this kernel reads each weight
// row once for all rows of x. The weight stays in Hugging Face's [out, in] layout. Tasks are
// chunks of output columns, shared with the threads of XLA's own pool. Up to 8 rows, a tile
// computes 4 rows of x against 4 weight rows as dot products in vector registers (GCC/Clang
// vector extensions); from 9 to 48 rows (a batch of decodes, where the arithmetic starts to
// count) x is transposed once and a tile accumulates 8 output columns for every row at once.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;           // floats per vector
constexpr int64_t kColumnsPerTask = 64;  // weight rows (output columns) per task
// Each weight row is prefetched this far ahead of its loads (4 KB: across the page boundaries the
// hardware prefetcher stops at, into the next rows); measured faster on SmolLM2's shapes.
constexpr int64_t kPrefetchFloats = 1024;
typedef float Vector __attribute__((vector_size(kLanes * sizeof(float))));

inline Vector Load(const float* p) {
  Vector v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef int32_t Indices __attribute__((vector_size(kLanes * sizeof(int32_t))));

// The sum of a vector's lanes by halving (4 shuffles and adds rather than 15 scalar adds).
inline float Sum(Vector v) {
  v += __builtin_shuffle(v, Indices{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, Indices{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, Indices{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  v += __builtin_shuffle(v, Indices{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return v[0];
}

// out[m][n] for MT rows of x (from row m0) and NT weight rows (from row n0).
template <int MT, int NT>
void Tile(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t m0,
          int64_t n0) {
  Vector acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = Vector{};
  const int64_t vector_end = K - K % kLanes;
  for (int64_t k = 0; k < vector_end; k += kLanes) {
    Vector wv[NT];
    for (int j = 0; j < NT; ++j) {
      __builtin_prefetch(w + (n0 + j) * K + k + kPrefetchFloats);
      wv[j] = Load(w + (n0 + j) * K + k);
    }
    for (int i = 0; i < MT; ++i) {
      const Vector xv = Load(x + (m0 + i) * K + k);
      for (int j = 0; j < NT; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) {
      float total = Sum(acc[i][j]);
      for (int64_t k = vector_end; k < K; ++k) total += x[(m0 + i) * K + k] * w[(n0 + j) * K + k];
      out[(m0 + i) * N + n0 + j] = total;
    }
  }
}

template <int NT>
void Rows(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N,
          int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) Tile<4, NT>(x, w, out, K, N, m, n0);
  switch (M - m) {
    case 3: Tile<3, NT>(x, w, out, K, N, m, n0); break;
    case 2: Tile<2, NT>(x, w, out, K, N, m, n0); break;
    case 1: Tile<1, NT>(x, w, out, K, N, m, n0); break;
    default: break;
  }
}

void Columns(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N,
             int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) Rows<4>(x, w, out, M, K, N, n);
  for (; n < end; ++n) Rows<1>(x, w, out, M, K, N, n);
}

// More rows (9 to 48: a batch of decodes, where the arithmetic starts to count): x comes
// transposed, xt [K, padded rows] (rows padded to a multiple of kLanes with zeros; XLA
// transposes it before the call). A tile of NT weight rows then computes every row of x as MV
// vectors: for each k, MV vectors of xt times weight row j's k-th entry, broadcast. Nothing is
// summed across lanes (the dot-product tile above sums each of its accumulators at the end,
// which costs as much as the products when there are many rows), and each weight row still
// streams from memory once.

// acc [columns, MV * kLanes] += x[:, k0:k1] @ w[n0:n0 + columns, k0:k1].T, transposed: for each
// k, MV vectors of xt times weight row j's k-th entry, broadcast.
template <int MV, int NT>
void BroadcastTile(const float* xt, const float* w, float* acc_out, int64_t K, int64_t n0,
                   int64_t columns, int64_t k0, int64_t k1, bool first) {
  constexpr int64_t kPadded = MV * kLanes;
  const float* rows[NT];  // the tile's weight rows; past the last column, repeats of the last
  for (int j = 0; j < NT; ++j) rows[j] = w + (n0 + std::min<int64_t>(j, columns - 1)) * K;
  Vector acc[MV][NT];
  for (int v = 0; v < MV; ++v)
    for (int j = 0; j < NT; ++j)
      acc[v][j] = first ? Vector{} : Load(acc_out + j * kPadded + v * kLanes);
  for (int64_t kb = k0; kb < k1; kb += kLanes) {
    // The next tile's rows, at the same k: the weight's lines arrive before they are read.
    for (int j = 0; j < NT; ++j) __builtin_prefetch(rows[j] + NT * K + kb);
    const int64_t k_end = std::min(k1, kb + kLanes);
    for (int64_t k = kb; k < k_end; ++k) {
      Vector xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = Load(xt + k * kPadded + v * kLanes);
      for (int j = 0; j < NT; ++j) {
        const float weight = rows[j][k];
        for (int v = 0; v < MV; ++v) acc[v][j] += weight * xv[v];
      }
    }
  }
  for (int v = 0; v < MV; ++v)
    for (int j = 0; j < NT; ++j) std::memcpy(acc_out + j * kPadded + v * kLanes, &acc[v][j],
                                             sizeof(Vector));
}

// One task's columns [begin, end): depth blocks outermost, so each block of xt is read from L1
// by every tile; partial sums live in a [columns, padded rows] buffer, written out at the end.
template <int MV, int NT>
void BroadcastColumns(const float* xt, const float* w, float* out, int64_t M, int64_t K,
                      int64_t N, int64_t begin, int64_t end) {
  constexpr int64_t kPadded = MV * kLanes;
  // k per pass: the pass's slice of xt (16 KB) stays in L1 beside the partial sums.
  constexpr int64_t kDepthBlock = 4096 / kPadded / kLanes * kLanes;
  float partial[kColumnsPerTask + NT][kPadded];
  for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
    const int64_t k1 = std::min(K, k0 + kDepthBlock);
    for (int64_t n = begin; n < end; n += NT)
      BroadcastTile<MV, NT>(xt, w, partial[n - begin], K, n, std::min<int64_t>(NT, end - n), k0,
                            k1, k0 == 0);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = begin; n < end; ++n) out[m * N + n] = partial[n - begin][m];
}

template <typename Columns>
void ForColumnTasks(ffi::ThreadPool& pool, int64_t N, const Columns& columns) {
  struct NoState {};
  folojax::ParallelFor<NoState>(pool, (N + kColumnsPerTask - 1) / kColumnsPerTask,
                                [&](int64_t task, NoState&) {
                                  const int64_t begin = task * kColumnsPerTask;
                                  columns(begin, std::min(N, begin + kColumnsPerTask));
                                });
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[1]) {
    return ffi::Error::InvalidArgument(
        "small_matmul: expected x [rows, in] and w [out, in] with the same in");
  }
  const int64_t M = x_dims[0], K = x_dims[1], N = w_dims[0];
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* out_data = out->typed_data();
  ForColumnTasks(pool, N, [&](int64_t begin, int64_t end) {
    Columns(x_data, w_data, out_data, M, K, N, begin, end);
  });
  return ffi::Error::Success();
}

ffi::Error ManyRowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xt,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xt_dims = xt.dimensions();
  const auto w_dims = w.dimensions();
  const auto out_dims = out->dimensions();
  if (xt_dims.size() != 2 || w_dims.size() != 2 || xt_dims[0] != w_dims[1] ||
      out_dims[1] != w_dims[0] || xt_dims[1] % kLanes != 0 || out_dims[0] > xt_dims[1] ||
      out_dims[0] + kLanes <= xt_dims[1]) {
    return ffi::Error::InvalidArgument(
        "many_rows_matmul: expected xt [in, rows padded to a multiple of 16], w [out, in] and "
        "a result [rows, out]");
  }
  const int64_t M = out_dims[0], K = w_dims[1], N = w_dims[0];
  const float* t = xt.typed_data();
  const float* w_data = w.typed_data();
  float* out_data = out->typed_data();
  // 8, 16 or 24 accumulators (of 32 vector registers); 8 weight rows, whose addresses stay in
  // general registers (12 did not: measured half the speed). 9-16 rows in one vector: measured
  // faster than the dot-product tiles (docs/BENCHMARKS.md).
  switch (xt_dims[1] / kLanes) {
    case 1:
      ForColumnTasks(pool, N, [&](int64_t b, int64_t e) {
        BroadcastColumns<1, 8>(t, w_data, out_data, M, K, N, b, e);
      });
      return ffi::Error::Success();
    case 2:
      ForColumnTasks(pool, N, [&](int64_t b, int64_t e) {
        BroadcastColumns<2, 8>(t, w_data, out_data, M, K, N, b, e);
      });
      return ffi::Error::Success();
    case 3:
      ForColumnTasks(pool, N, [&](int64_t b, int64_t e) {
        BroadcastColumns<3, 8>(t, w_data, out_data, M, K, N, b, e);
      });
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("many_rows_matmul: 9 to 48 rows of x");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [rows, in]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [out, in]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [rows, out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxManyRowsMatmul, ManyRowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xt [in, padded rows]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [out, in]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [rows, out]
