// x @ w.T on the CPU for weights kept quantized, in the panel layout of panel_matmul.cc: each
// weight is code * scale + offset, with one scale and one offset per output column and group of
// `in / G` consecutive depths. Called from jitted code through XLA's FFI
// (folojax/ops/quant_matmul.py, which describes the layout; cpu_kernels.py builds it).
//
//   codes   [P, in, 64] int8 (8 bits), or [P, in, 32] uint8 (4 bits: byte b of a depth holds
//           column b in its low nibble and column b + 32 in its high nibble)
//   scales  [P, G, 64] float16, offsets [P, G, 64] float16
//
// With the attribute zero_points, `offsets` holds zero points z instead (GPTQ's), and each
// weight is (code - z) * scale: the offset -z * scale is formed in float32, exactly.
//
// Few rows (decode): a tile of rows takes a panel at once, streaming its codes. Within a group
// it sums x[k] * code over the group's depths, then adds scale * that sum + offset * (the sum of
// x over the group): one conversion per weight and one multiply-add per weight and row, the
// scale and offset once per group. Further tiles read the panel's codes again from L1 or L2.
// More rows (prefill, large batches): each panel is first dequantized into a float32 panel in
// the thread's scratch memory, and the float tiles of panel_tile.h run over it, so the
// conversion is paid once per panel, not once per row.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "panel_tile.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using folojax::kLanes;
using folojax::kLine;
using folojax::kPanel;
using folojax::kPanelVectors;
using folojax::Vector;

// From this many rows on, a panel is dequantized once and the float tiles run over it.
constexpr int64_t kDequantizeFromRows = 32;
// Rows per tile below that: as many as the registers hold (each row needs two accumulators per
// vector of the panel, beside the panel's vectors of weights).
#if defined(__AVX512F__)
constexpr int64_t kQuantTileRows = 3;  // 24 accumulators + 4 weight vectors of 32 registers
#else
constexpr int64_t kQuantTileRows = 1;
#endif

// The codes of columns [column, column + kLanes) at one depth, as floats: `depth` points at the
// depth's kPanel * kBits / 8 bytes. `column` is a multiple of kLanes.
template <int kBits>
inline Vector LoadCodes(const uint8_t* depth, int64_t column) {
  const uint8_t* bytes = depth + (kBits == 8 ? column : column % (kPanel / 2));
  const bool high = kBits == 4 && column >= kPanel / 2;
#if defined(__AVX512F__)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  __m512i wide;
  if constexpr (kBits == 8) {
    wide = _mm512_cvtepi8_epi32(raw);
  } else {
    wide = _mm512_cvtepu8_epi32(raw);
    wide = high ? _mm512_srli_epi32(wide, 4) : _mm512_and_si512(wide, _mm512_set1_epi32(15));
  }
  return _mm512_cvtepi32_ps(wide);
#elif defined(__AVX2__)
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  __m256i wide;
  if constexpr (kBits == 8) {
    wide = _mm256_cvtepi8_epi32(raw);
  } else {
    wide = _mm256_cvtepu8_epi32(raw);
    wide = high ? _mm256_srli_epi32(wide, 4) : _mm256_and_si256(wide, _mm256_set1_epi32(15));
  }
  return _mm256_cvtepi32_ps(wide);
#else
  Vector v;
  for (int64_t i = 0; i < kLanes; ++i) {
    const int code = kBits == 8 ? static_cast<int8_t>(bytes[i])
                                : (high ? bytes[i] >> 4 : bytes[i] & 15);
    v[i] = static_cast<float>(code);
  }
  return v;
#endif
}

#if !defined(__AVX2__) && !defined(__AVX512F__)
inline float HalfToFloat(uint16_t half) {  // IEEE binary16 -> binary32, subnormals included
  const uint32_t sign = (half & 0x8000u) << 16, exponent = (half >> 10) & 0x1f,
                 mantissa = half & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // m * 2^-24
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13)
                                               : ((exponent + 112) << 23) | (mantissa << 13));
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
#endif

// kLanes float16 values as floats.
inline Vector LoadHalves(const uint16_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  Vector v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = HalfToFloat(p[i]);
  return v;
#endif
}

struct QuantPanel {  // one panel's codes, scales and offsets
  const uint8_t* codes;     // [K, kPanel * kBits / 8]
  const uint16_t* scales;   // [G, kPanel]
  const uint16_t* offsets;  // [G, kPanel]
  bool zero_points;         // offsets holds zero points (see the top)
};

// The offsets of the panel's group g, columns [column, column + kLanes), given their scales.
inline Vector GroupOffsets(const QuantPanel& panel, int64_t g, int64_t column,
                           const Vector& scale) {
  const Vector stored = LoadHalves(panel.offsets + g * kPanel + column);
  return panel.zero_points ? -(stored * scale) : stored;
}

// out[0:R, 0:columns] = x[0:R, :] @ the panel, x rows K apart, out rows `ldo` apart; `x_sums`
// [R, G] holds each row's sums of x over each group. Prefetches `prefetch_bytes` per depth from
// `prefetch` on the way.
template <int kBits, int R>
void QuantTile(const float* x, const float* x_sums, const QuantPanel& panel, int64_t K,
               int64_t G, float* out, int64_t ldo, int64_t columns, const char* prefetch,
               int64_t prefetch_bytes) {
  constexpr int64_t kDepthBytes = kPanel * kBits / 8;
  const int64_t group_size = K / G;
  Vector acc[R][kPanelVectors];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kPanelVectors; ++j) acc[i][j] = Vector{};
  for (int64_t g = 0; g < G; ++g) {
    Vector sums[R][kPanelVectors];  // x[k] * code, summed over the group's depths
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kPanelVectors; ++j) sums[i][j] = Vector{};
    for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
      for (int64_t b = 0; b < prefetch_bytes; b += kLine)
        __builtin_prefetch(prefetch + k * prefetch_bytes + b, 0, 2);
      const uint8_t* depth = panel.codes + k * kDepthBytes;
      Vector w[kPanelVectors];
      for (int j = 0; j < kPanelVectors; ++j) w[j] = LoadCodes<kBits>(depth, j * kLanes);
      for (int i = 0; i < R; ++i) {
        const float xs = x[i * K + k];
        for (int j = 0; j < kPanelVectors; ++j) sums[i][j] += xs * w[j];
      }
    }
    for (int j = 0; j < kPanelVectors; ++j) {
      const Vector scale = LoadHalves(panel.scales + g * kPanel + j * kLanes);
      const Vector offset = GroupOffsets(panel, g, j * kLanes, scale);
      for (int i = 0; i < R; ++i) acc[i][j] += sums[i][j] * scale + x_sums[i * G + g] * offset;
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

// The panel's weights as floats, [K, kPanel], into `out`.
template <int kBits>
void DequantizePanel(const QuantPanel& panel, int64_t K, int64_t G, float* out) {
  constexpr int64_t kDepthBytes = kPanel * kBits / 8;
  const int64_t group_size = K / G;
  for (int64_t g = 0; g < G; ++g) {
    Vector scale[kPanelVectors], offset[kPanelVectors];
    for (int j = 0; j < kPanelVectors; ++j) {
      scale[j] = LoadHalves(panel.scales + g * kPanel + j * kLanes);
      offset[j] = GroupOffsets(panel, g, j * kLanes, scale[j]);
    }
    for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
      const uint8_t* depth = panel.codes + k * kDepthBytes;
      for (int j = 0; j < kPanelVectors; ++j) {
        const Vector w = LoadCodes<kBits>(depth, j * kLanes) * scale[j] + offset[j];
        std::memcpy(out + k * kPanel + j * kLanes, &w, sizeof(w));
      }
    }
  }
}

struct Scratch {
  std::vector<float> panel;  // one dequantized panel, [K, kPanel]
};

struct Problem {
  const float* x;       // [M, K]
  const float* x_sums;  // [M, G]
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* offsets;
  bool zero_points;
  float* out;  // [M, N]
  int64_t M, K, N, G;
};

// Panels [begin, end) against all M rows of x.
template <int kBits>
void Panels(const Problem& problem, int64_t begin, int64_t end, Scratch& scratch) {
  const int64_t M = problem.M, K = problem.K, N = problem.N, G = problem.G;
  const int64_t codes_bytes = K * kPanel * kBits / 8, group_values = G * kPanel;
  const bool dequantize = M >= kDequantizeFromRows;
  if (dequantize) scratch.panel.resize(K * kPanel);
  for (int64_t p = begin; p < end; ++p) {
    const QuantPanel panel{problem.codes + p * codes_bytes, problem.scales + p * group_values,
                           problem.offsets + p * group_values, problem.zero_points};
    // The task's next panel's codes; the last one prefetches nothing (it is another task's).
    const char* next = reinterpret_cast<const char*>(panel.codes + codes_bytes);
    const int64_t next_bytes = p + 1 < end ? codes_bytes : 0;
    const int64_t n0 = p * kPanel, columns = std::min(kPanel, N - n0);
    if (dequantize) {
      DequantizePanel<kBits>(panel, K, G, scratch.panel.data());
      folojax::FloatPanel(problem.x, M, K, scratch.panel.data(), problem.out, N, n0, columns,
                          next, next_bytes);
      continue;
    }
    // Tiles of kQuantTileRows rows, then one of the rest; each prefetches its share.
    const int64_t passes = (M + kQuantTileRows - 1) / kQuantTileRows;
    const int64_t share = next_bytes / passes;
    const int64_t step = next_bytes ? std::max<int64_t>(kLine / 2, share / K) : 0;
    for (int64_t m = 0, pass = 0; m < M; m += kQuantTileRows, ++pass) {
      const float* x = problem.x + m * K;
      const float* x_sums = problem.x_sums + m * G;
      float* out = problem.out + m * N + n0;
      const char* prefetch = next + pass * share;
      const int64_t rows = std::min<int64_t>(kQuantTileRows, M - m);
      if (rows == 3) {
        QuantTile<kBits, 3>(x, x_sums, panel, K, G, out, N, columns, prefetch, step);
      } else if (rows == 2) {
        QuantTile<kBits, 2>(x, x_sums, panel, K, G, out, N, columns, prefetch, step);
      } else {
        QuantTile<kBits, 1>(x, x_sums, panel, K, G, out, N, columns, prefetch, step);
      }
    }
  }
}

ffi::Error QuantMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                       ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> offsets,
                       ffi::ResultBuffer<ffi::F32> out, bool zero_points) {
  const auto x_dims = x.dimensions(), c_dims = codes.dimensions(), s_dims = scales.dimensions(),
             o_dims = offsets.dimensions(), out_dims = out->dimensions();
  const bool eight_bits = codes.element_type() == ffi::DataType::S8;
  const bool four_bits = codes.element_type() == ffi::DataType::U8;
  const int64_t depth_bytes = eight_bits ? kPanel : kPanel / 2;
  if (x_dims.size() != 2 || c_dims.size() != 3 || s_dims.size() != 3 || o_dims.size() != 3 ||
      !(eight_bits || four_bits) || c_dims[2] != depth_bytes || x_dims[1] != c_dims[1] ||
      s_dims[0] != c_dims[0] || s_dims[2] != kPanel || s_dims[1] < 1 ||
      c_dims[1] % s_dims[1] != 0 || o_dims[0] != s_dims[0] || o_dims[1] != s_dims[1] ||
      o_dims[2] != s_dims[2] || out_dims[0] != x_dims[0] ||
      (out_dims[1] + kPanel - 1) / kPanel != c_dims[0]) {
    return ffi::Error::InvalidArgument(
        "quant_matmul: expected x [rows, in], codes int8 [P, in, 64] or uint8 [P, in, 32], "
        "scales and offsets float16 [P, G, 64] with G dividing in, and a result [rows, out] "
        "with P = ceil(out / 64)");
  }
  const int64_t M = x_dims[0], K = x_dims[1], N = out_dims[1], num_panels = c_dims[0],
                G = s_dims[1];
  const float* x_data = x.typed_data();
  std::vector<float> x_sums(M * G);  // each row's sum over each group's depths
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0;
      for (int64_t k = g * (K / G); k < (g + 1) * (K / G); ++k) sum += x_data[m * K + k];
      x_sums[m * G + g] = sum;
    }
  const Problem problem{x_data,          x_sums.data(),
                        static_cast<const uint8_t*>(codes.untyped_data()),
                        scales.typed_data(), offsets.typed_data(), zero_points,
                        out->typed_data(), M, K, N, G};
  // As panel_matmul.cc: about 8 tasks per thread, at most 8 panels per task.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_task = std::clamp<int64_t>(num_panels / (8 * threads), 1, 8);
  folojax::ParallelFor<Scratch>(pool, (num_panels + per_task - 1) / per_task,
                                [&](int64_t task, Scratch& scratch) {
                                  const int64_t begin = task * per_task;
                                  const int64_t end = std::min(num_panels, begin + per_task);
                                  if (eight_bits) {
                                    Panels<8>(problem, begin, end, scratch);
                                  } else {
                                    Panels<4>(problem, begin, end, scratch);
                                  }
                                });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxQuantMatmul, QuantMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [rows, in]
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::Buffer<ffi::F16>>()  // scales [P, G, 64]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // offsets [P, G, 64]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // [rows, out]
                                  .Attr<bool>("zero_points"));
