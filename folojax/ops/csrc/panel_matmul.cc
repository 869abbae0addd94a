// x @ w.T on the CPU for any number of rows of x, with w repacked once at load time into
// panels: w_panels [ceil(out / 64), in, 64], where panel p, depth k holds w[64p .. 64p + 63, k]
// (zeros past the last output). Called from jitted code through XLA's FFI
// (folojax/ops/cpu_matmul.py; folojax/ops/cpu_kernels.py compiles and registers it).
//
// A panel streams from memory as one contiguous run, so the hardware prefetcher follows it, and
// the kernel prefetches the next panel into L2 while it computes the current one. A tile holds
// 6 rows of x times a panel's 64 columns in 24 vector registers: for each depth k it loads the
// panel's 4 vectors once and broadcasts 6 entries of x, 24 multiply-adds with no sums across
// lanes. Every 6 rows of x read the panel again, from L2. Results are written in place, [rows,
// out]: nothing is transposed before or after. Tasks are runs of panels, shared with the threads
// of XLA's own pool.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;                      // floats per vector
constexpr int kPanelVectors = 4;                    // vectors across a panel
constexpr int64_t kPanel = kPanelVectors * kLanes;  // output columns per panel
constexpr int kTileRows = 6;                        // rows of x per tile: 24 accumulators
constexpr int64_t kLine = 64;                       // bytes per cache line
typedef float Vector __attribute__((vector_size(kLanes * sizeof(float))));

inline Vector Load(const float* p) {
  Vector v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[0:R, 0:columns] = x[0:R, :] @ panel, x rows `ldx` apart and out rows `ldo` apart; on the
// way it prefetches `prefetch_bytes` per depth step of the region starting at `prefetch` (a
// share of the next panel).
template <int R>
void Tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out, int64_t ldo,
          int64_t columns, const char* prefetch, int64_t prefetch_bytes) {
  Vector acc[R][kPanelVectors];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kPanelVectors; ++j) acc[i][j] = Vector{};
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t b = 0; b < prefetch_bytes; b += kLine)
      __builtin_prefetch(prefetch + k * prefetch_bytes + b, 0, 2);
    const float* depth = panel + k * kPanel;
    Vector w[kPanelVectors];
    for (int j = 0; j < kPanelVectors; ++j) w[j] = Load(depth + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const float xs = x[i * ldx + k];
      for (int j = 0; j < kPanelVectors; ++j) acc[i][j] += xs * w[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    if (columns == kPanel) {
      std::memcpy(out + i * ldo, acc[i], sizeof(acc[i]));
    } else {
      std::memcpy(out + i * ldo, acc[i], columns * sizeof(float));
    }
  }
}

// Panels [begin, end) against all M rows of x.
void Panels(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N,
            int64_t begin, int64_t end) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  // Each tile prefetches its share of the next panel, spread evenly over its depth steps (at
  // least half a line per step: a step then touches a line every other time).
  const int64_t share = K * kPanel * sizeof(float) / tiles;
  const int64_t step_bytes = std::max<int64_t>(kLine / 2, share / K);
  for (int64_t p = begin; p < end; ++p) {
    const float* panel = w + p * K * kPanel;
    // The task's next panel; the last one prefetches nothing (the next panel is another task's).
    const char* next = reinterpret_cast<const char*>(panel + K * kPanel);
    const int64_t step = p + 1 < end ? step_bytes : 0;
    const int64_t n0 = p * kPanel, columns = std::min(kPanel, N - n0);
    int64_t t = 0, m = 0;
    for (; m + kTileRows <= M; m += kTileRows, ++t)
      Tile<kTileRows>(x + m * K, K, panel, K, out + m * N + n0, N, columns, next + t * share,
                      step);
    const char* prefetch = next + t * share;
    float* o = out + m * N + n0;
    switch (M - m) {
      case 5: Tile<5>(x + m * K, K, panel, K, o, N, columns, prefetch, step); break;
      case 4: Tile<4>(x + m * K, K, panel, K, o, N, columns, prefetch, step); break;
      case 3: Tile<3>(x + m * K, K, panel, K, o, N, columns, prefetch, step); break;
      case 2: Tile<2>(x + m * K, K, panel, K, o, N, columns, prefetch, step); break;
      case 1: Tile<1>(x + m * K, K, panel, K, o, N, columns, prefetch, step); break;
      default: break;
    }
  }
}

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w_panels, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w_panels.dimensions();
  const auto out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || w_dims[2] != kPanel ||
      x_dims[1] != w_dims[1] || out_dims[0] != x_dims[0] ||
      (out_dims[1] + kPanel - 1) / kPanel != w_dims[0]) {
    return ffi::Error::InvalidArgument(
        "panel_matmul: expected x [rows, in], w_panels [ceil(out / 64), in, 64] and a result "
        "[rows, out]");
  }
  const int64_t M = x_dims[0], K = x_dims[1], N = out_dims[1], num_panels = w_dims[0];
  const float* x_data = x.typed_data();
  const float* w_data = w_panels.typed_data();
  float* out_data = out->typed_data();
  // About 8 tasks per thread, so that a slow start of one thread costs little; at most 8
  // panels per task.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_task = std::clamp<int64_t>(num_panels / (8 * threads), 1, 8);
  struct NoState {};
  folojax::ParallelFor<NoState>(pool, (num_panels + per_task - 1) / per_task,
                                [&](int64_t task, NoState&) {
                                  const int64_t begin = task * per_task;
                                  Panels(x_data, w_data, out_data, M, K, N, begin,
                                         std::min(num_panels, begin + per_task));
                                });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxPanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [rows, in]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_panels [panels, in, 64]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [rows, out]
