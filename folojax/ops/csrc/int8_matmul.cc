// x @ w.T on the CPU with int8 weights and int8 activations (W8A8), through XLA's FFI
// (folojax/ops/int8_matmul.py describes the layout and the math; cpu_kernels.py builds it).
//
//   codes   [P, Q, 256] uint8: panel p, quad q holds, for its 64 output columns c, the codes of
//           depths 4q .. 4q + 3 at bytes 4c .. 4c + 3, each plus 128 (so 0..255)
//   scales  [P, 64] float32: one scale per output column
//
// Each row of x is quantized first, per block of 32 depths: s = max |x| / 127 over the block,
// x_q = round(x * (127 / max |x|)) in -127..127 (a block of zeros: s = 0, x_q = 0). Then, per
// block, the integer sums of code * x_q are exact in int32, and
//   out[m, n] = scale[n] * sum over blocks b of s[m, b] * (sum of (code - 128) * x_q over b).
// With AVX-512 VNNI, `vpdpbusd` multiplies 4 unsigned codes by 4 signed x_q and adds them into
// one int32 lane: 64 multiply-adds an instruction. The +128 is taken out once per block and row:
// sum (code + 128) * x_q = sum code * x_q + 128 * sum x_q. Without VNNI, AVX2's `vpmaddubsw`
// takes |code - 128| and x_q with the code's sign (products fit int16 in pairs), then
// `vpmaddwd` by ones sums the pairs into int32.
//
// A tile of up to 3 rows takes a panel at once: for each quad it loads the panel's 256 bytes
// and broadcasts each row's 4 x_q; every row count, prefill's included, runs these tiles (no
// row count changes the arithmetic, so a row's result does not depend on its batch).

#include <algorithm>
#include <cmath>
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

using folojax::kPanel;                   // output columns per panel, as the float kernel's
constexpr int64_t kQuadBytes = kPanel * 4;  // one quad of depths across a panel
constexpr int64_t kBlock = 32;           // depths per activation scale
constexpr int64_t kBlockQuads = kBlock / 4;
constexpr int kTileRows = 3;

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kLanes = 16;  // int32 lanes per vector
typedef __m512i IntVector;
inline IntVector LoadInts(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline IntVector Broadcast(int32_t v) { return _mm512_set1_epi32(v); }
inline IntVector Zero() { return _mm512_setzero_si512(); }
inline IntVector Sub(IntVector a, IntVector b) { return _mm512_sub_epi32(a, b); }
inline __m512 ToFloats(IntVector v) { return _mm512_cvtepi32_ps(v); }
typedef __m512 FloatVector;
inline FloatVector FloatZero() { return _mm512_setzero_ps(); }
inline FloatVector FloatBroadcast(float v) { return _mm512_set1_ps(v); }
inline FloatVector MulAdd(FloatVector a, FloatVector b, FloatVector c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline FloatVector LoadFloats(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreFloats(float* p, FloatVector v) { _mm512_storeu_ps(p, v); }
#if defined(__AVX512VNNI__)
constexpr bool kBiasedCodes = true;  // the sums include +128 * x_q (taken out per block)
inline IntVector DotQuads(IntVector acc, IntVector codes, IntVector x) {
  return _mm512_dpbusd_epi32(acc, codes, x);
}
#else
constexpr bool kBiasedCodes = false;
inline IntVector DotQuads(IntVector acc, IntVector codes, IntVector x) {
  const IntVector signed_codes = _mm512_xor_si512(codes, _mm512_set1_epi8(-128));
  const IntVector magnitudes = _mm512_abs_epi8(signed_codes);
  // x_q with each code's sign (x_q * sign(code)): sign via a mask, as AVX-512 has no vpsignb.
  const __mmask64 negative = _mm512_movepi8_mask(signed_codes);
  const IntVector signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
  const IntVector pairs = _mm512_maddubs_epi16(magnitudes, signed_x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
#endif
#elif defined(__AVX2__)
constexpr int kLanes = 8;
typedef __m256i IntVector;
inline IntVector LoadInts(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline IntVector Broadcast(int32_t v) { return _mm256_set1_epi32(v); }
inline IntVector Zero() { return _mm256_setzero_si256(); }
inline IntVector Sub(IntVector a, IntVector b) { return _mm256_sub_epi32(a, b); }
inline __m256 ToFloats(IntVector v) { return _mm256_cvtepi32_ps(v); }
typedef __m256 FloatVector;
inline FloatVector FloatZero() { return _mm256_setzero_ps(); }
inline FloatVector FloatBroadcast(float v) { return _mm256_set1_ps(v); }
inline FloatVector MulAdd(FloatVector a, FloatVector b, FloatVector c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline FloatVector LoadFloats(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreFloats(float* p, FloatVector v) { _mm256_storeu_ps(p, v); }
#if defined(__AVXVNNI__)
constexpr bool kBiasedCodes = true;
inline IntVector DotQuads(IntVector acc, IntVector codes, IntVector x) {
  return _mm256_dpbusd_avx_epi32(acc, codes, x);
}
#else
constexpr bool kBiasedCodes = false;
inline IntVector DotQuads(IntVector acc, IntVector codes, IntVector x) {
  const IntVector signed_codes = _mm256_xor_si256(codes, _mm256_set1_epi8(-128));
  const IntVector pairs =
      _mm256_maddubs_epi16(_mm256_abs_epi8(signed_codes), _mm256_sign_epi8(x, signed_codes));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
#else
#define FOLOJAX_INT8_SCALAR 1
#endif

// One row of x, quantized: x_q [blocks * 32] (zeros past K), and per block its scale and (for
// biased codes) 128 * the sum of its x_q.
struct QuantizedRows {
  std::vector<int8_t> values;       // [M, blocks * 32]
  std::vector<float> scales;        // [M, blocks]
  std::vector<int32_t> biases;      // [M, blocks]: 128 * sum of the block's x_q
  int64_t blocks = 0;
};

void QuantizeRow(const float* x, int64_t K, int64_t blocks, int8_t* values, float* scales,
                 int32_t* biases) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, end = std::min(K, begin + kBlock);
    float largest = 0;
    for (int64_t k = begin; k < end; ++k) largest = std::max(largest, std::fabs(x[k]));
    const float inverse = largest > 0 ? 127.0f / largest : 0.0f;
    scales[b] = largest / 127.0f;
    int32_t sum = 0;
    for (int64_t k = begin; k < begin + kBlock; ++k) {
      const float scaled = k < end ? x[k] * inverse : 0.0f;
      const int32_t q = std::clamp(static_cast<int32_t>(std::nearbyint(scaled)), -127, 127);
      values[k] = static_cast<int8_t>(q);
      sum += q;
    }
    biases[b] = 128 * sum;
  }
}

struct Problem {
  const QuantizedRows* rows;
  const uint8_t* codes;   // [P, Q, 256]
  const float* scales;    // [P, 64]
  float* out;             // [M, N]
  int64_t M, K, N, Q;
};

#if !defined(FOLOJAX_INT8_SCALAR)
constexpr int kVectors = kPanel / kLanes;  // vectors across a panel

// out rows [m, m + R) of the panel's columns.
template <int R>
void Tile(const Problem& problem, int64_t m, const uint8_t* codes, const float* column_scales,
          float* out, int64_t columns) {
  const QuantizedRows& rows = *problem.rows;
  const int64_t stride = rows.blocks * kBlock;
  FloatVector total[R][kVectors];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVectors; ++j) total[i][j] = FloatZero();
  for (int64_t b = 0; b < rows.blocks; ++b) {
    IntVector sums[R][kVectors];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kVectors; ++j) sums[i][j] = Zero();
    const int64_t q_end = std::min(problem.Q, (b + 1) * kBlockQuads);
    for (int64_t q = b * kBlockQuads; q < q_end; ++q) {
      const uint8_t* quad = codes + q * kQuadBytes;
      IntVector w[kVectors];
      for (int j = 0; j < kVectors; ++j) w[j] = LoadInts(quad + j * kLanes * 4);
      for (int i = 0; i < R; ++i) {
        int32_t packed;
        std::memcpy(&packed, rows.values.data() + (m + i) * stride + q * 4, 4);
        const IntVector x = Broadcast(packed);
        for (int j = 0; j < kVectors; ++j) sums[i][j] = DotQuads(sums[i][j], w[j], x);
      }
    }
    for (int i = 0; i < R; ++i) {
      const FloatVector scale = FloatBroadcast(rows.scales[(m + i) * rows.blocks + b]);
      const IntVector bias = Broadcast(kBiasedCodes ? rows.biases[(m + i) * rows.blocks + b] : 0);
      for (int j = 0; j < kVectors; ++j)
        total[i][j] = MulAdd(ToFloats(Sub(sums[i][j], bias)), scale, total[i][j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float result[kPanel];
    for (int j = 0; j < kVectors; ++j)
      StoreFloats(result + j * kLanes,
                  total[i][j] * LoadFloats(column_scales + j * kLanes));
    std::memcpy(out + (m + i) * problem.N, result, columns * sizeof(float));
  }
}
#endif

void Panel(const Problem& problem, int64_t p) {
  const uint8_t* codes = problem.codes + p * problem.Q * kQuadBytes;
  const float* column_scales = problem.scales + p * kPanel;
  const int64_t n0 = p * kPanel, columns = std::min(kPanel, problem.N - n0);
  float* out = problem.out + n0;
#if defined(FOLOJAX_INT8_SCALAR)
  const QuantizedRows& rows = *problem.rows;
  const int64_t stride = rows.blocks * kBlock;
  for (int64_t m = 0; m < problem.M; ++m) {
    for (int64_t c = 0; c < columns; ++c) {
      float total = 0;
      for (int64_t b = 0; b < rows.blocks; ++b) {
        int32_t sum = 0;
        for (int64_t k = b * kBlock; k < std::min(problem.Q * 4, (b + 1) * kBlock); ++k)
          sum += (static_cast<int32_t>(codes[(k / 4) * kQuadBytes + c * 4 + k % 4]) - 128) *
                 rows.values[m * stride + k];
        total += static_cast<float>(sum) * rows.scales[m * rows.blocks + b];
      }
      out[m * problem.N + c] = total * column_scales[c];
    }
  }
#else
  int64_t m = 0;
  for (; m + kTileRows <= problem.M; m += kTileRows)
    Tile<kTileRows>(problem, m, codes, column_scales, out, columns);
  if (problem.M - m == 2) Tile<2>(problem, m, codes, column_scales, out, columns);
  if (problem.M - m == 1) Tile<1>(problem, m, codes, column_scales, out, columns);
#endif
}

struct NoScratch {};

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions(), c_dims = codes.dimensions(), s_dims = scales.dimensions(),
             out_dims = out->dimensions();
  if (x_dims.size() != 2 || c_dims.size() != 3 || s_dims.size() != 2 || out_dims.size() != 2 ||
      c_dims[2] != kQuadBytes || c_dims[1] != (x_dims[1] + 3) / 4 || s_dims[0] != c_dims[0] ||
      s_dims[1] != kPanel || out_dims[0] != x_dims[0] ||
      (out_dims[1] + kPanel - 1) / kPanel != c_dims[0]) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: expected x float32 [rows, in], codes uint8 [P, ceil(in / 4), 256], "
        "scales float32 [P, 64] and a result [rows, out] with P = ceil(out / 64)");
  }
  const int64_t M = x_dims[0], K = x_dims[1], N = out_dims[1], P = c_dims[0];
  QuantizedRows rows;
  rows.blocks = (K + kBlock - 1) / kBlock;
  rows.values.resize(M * rows.blocks * kBlock);
  rows.scales.resize(M * rows.blocks);
  rows.biases.resize(M * rows.blocks);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const float* x_data = x.typed_data();
  // Rows are quantized in parallel when there are many (prefill), then panels are shared out.
  const int64_t row_tasks = std::min<int64_t>(M, 4 * threads);
  folojax::ParallelFor<NoScratch>(pool, row_tasks, [&](int64_t task, NoScratch&) {
    for (int64_t m = task * M / row_tasks; m < (task + 1) * M / row_tasks; ++m)
      QuantizeRow(x_data + m * K, K, rows.blocks, rows.values.data() + m * rows.blocks * kBlock,
                  rows.scales.data() + m * rows.blocks, rows.biases.data() + m * rows.blocks);
  });
  const Problem problem{&rows, codes.typed_data(), scales.typed_data(), out->typed_data(),
                        M, K, N, c_dims[1]};
  // As panel_matmul.cc: about 8 tasks per thread, at most 8 panels per task.
  const int64_t per_task = std::clamp<int64_t>(P / (8 * threads), 1, 8);
  folojax::ParallelFor<NoScratch>(pool, (P + per_task - 1) / per_task,
                                  [&](int64_t task, NoScratch&) {
                                    const int64_t end = std::min(P, (task + 1) * per_task);
                                    for (int64_t p = task * per_task; p < end; ++p)
                                      Panel(problem, p);
                                  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FolojaxInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [rows, in]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // codes [P, Q, 256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales [P, 64]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [rows, out]
