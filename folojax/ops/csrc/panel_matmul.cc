// x @ w.T on the CPU for any number of rows of x, with w repacked once at load time into
// panels: w_panels [ceil(out / 64), in, 64], where panel p, depth k holds w[64p .. 64p + 63, k]
// (zeros past the last output). Called from jitted code through XLA's FFI
// (folojax/ops/cpu_matmul.py; folojax/ops/cpu_kernels.py compiles and registers it).
//
// A panel streams from memory as one contiguous run, so the hardware prefetcher follows it, and
// the kernel prefetches the next panel into L2 while it computes the current one; the register
// tiles are in panel_tile.h. Results are written in place, [rows, out]: nothing is transposed
// before or after. Tasks are runs of panels, shared with the threads of XLA's own pool.

#include <algorithm>
#include <cstdint>

#include "panel_tile.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using folojax::kPanel;

// Panels [begin, end) against all M rows of x.
void Panels(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N,
            int64_t begin, int64_t end) {
  const int64_t panel_floats = K * kPanel;
  for (int64_t p = begin; p < end; ++p) {
    const float* panel = w + p * panel_floats;
    // The task's next panel; the last one prefetches nothing (the next panel is another task's).
    const int64_t next_bytes = p + 1 < end ? panel_floats * sizeof(float) : 0;
    folojax::FloatPanel(x, M, K, panel, out, N, p * kPanel, std::min(kPanel, N - p * kPanel),
                        reinterpret_cast<const char*>(panel + panel_floats), next_bytes);
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
