// One float32 panel of w (depth k, column c at panel[k * kPanel + c]) against all rows of x:
// the register tiles shared by the float matmul (panel_matmul.cc) and the quantized one
// (quant_matmul.cc, which dequantizes a panel into a float scratch panel first when there are
// enough rows to pay for it).
//
// A tile holds up to 6 rows of x times a group of the panel's columns in vector registers: for
// each depth k it loads the group's vectors once and broadcasts 6 entries of x, with no sums
// across lanes. The group is as wide as the registers allow: with AVX-512 (32 registers of 16
// floats) the whole panel, 6 x 4 = 24 accumulators; with AVX2 (16 registers of 8 floats) a
// quarter of it, 6 x 2 = 12 accumulators, one group after another. A single row takes the whole
// panel at once, on both, and on AVX2 so do up to 11 rows, one after another. Every tile reads
// its group again, from L1 or L2. While it computes, it prefetches a share of the next panel
// (whatever memory the caller names) into L2.

#ifndef FOLOJAX_PANEL_TILE_H_
#define FOLOJAX_PANEL_TILE_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace folojax {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // floats per vector register
constexpr int kGroupVectors = 4;
#else
constexpr int64_t kLanes = 8;
constexpr int kGroupVectors = 2;
#endif
constexpr int64_t kPanel = 64;                            // output columns per panel
constexpr int kPanelVectors = kPanel / kLanes;            // vectors across a panel
constexpr int64_t kGroupColumns = kGroupVectors * kLanes;  // columns per tile of several rows
constexpr int64_t kGroups = kPanel / kGroupColumns;
constexpr int kTileRows = 6;
// With groups (AVX2), fewer rows than this take the panel one row at a time, which measured
// faster up to 8 rows and even at 12 (docs/BENCHMARKS.md).
constexpr int64_t kRowsOneByOneBelow = 12;
constexpr int64_t kLine = 64;  // bytes per cache line
typedef float Vector __attribute__((vector_size(kLanes * sizeof(float))));

inline Vector Load(const float* p) {
  Vector v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[0:R, 0:columns] = x[0:R, :] @ panel[:, 0:C * kLanes], x rows `ldx` apart, out rows `ldo`
// apart, `panel` pointing at the group's first column (depths kPanel apart); on the way it
// prefetches `prefetch_bytes` per depth step of the region starting at `prefetch` (a share of
// the next panel).
template <int R, int C>
void Tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out, int64_t ldo,
          int64_t columns, const char* prefetch, int64_t prefetch_bytes) {
  Vector acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = Vector{};
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t b = 0; b < prefetch_bytes; b += kLine)
      __builtin_prefetch(prefetch + k * prefetch_bytes + b, 0, 2);
    const float* depth = panel + k * kPanel;
    Vector w[C];
    for (int j = 0; j < C; ++j) w[j] = Load(depth + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const float xs = x[i * ldx + k];
      for (int j = 0; j < C; ++j) acc[i][j] += xs * w[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    if (columns == C * kLanes) {
      std::memcpy(out + i * ldo, acc[i], sizeof(acc[i]));  // a constant size: vector stores
    } else {
      std::memcpy(out + i * ldo, acc[i], columns * sizeof(float));
    }
  }
}

// The rows [m, M) of x that remain after the full tiles, fewer than kTileRows.
template <int C>
void LastTile(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t K,
              float* out, int64_t ldo, int64_t columns, const char* prefetch, int64_t step) {
  switch (rows) {
    case 5: Tile<5, C>(x, ldx, panel, K, out, ldo, columns, prefetch, step); break;
    case 4: Tile<4, C>(x, ldx, panel, K, out, ldo, columns, prefetch, step); break;
    case 3: Tile<3, C>(x, ldx, panel, K, out, ldo, columns, prefetch, step); break;
    case 2: Tile<2, C>(x, ldx, panel, K, out, ldo, columns, prefetch, step); break;
    case 1: Tile<1, C>(x, ldx, panel, K, out, ldo, columns, prefetch, step); break;
    default: break;
  }
}

// out[:, n0:n0 + columns] (rows N apart) = x [M, K] @ the panel's first `columns` columns. The
// passes over the panel together prefetch `next_bytes` from `next` (0: nothing).
inline void FloatPanel(const float* x, int64_t M, int64_t K, const float* panel, float* out,
                       int64_t N, int64_t n0, int64_t columns, const char* next,
                       int64_t next_bytes) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  // Few rows, where the panel is split into groups: each row takes the whole panel at once, the
  // first streaming it from memory in order and the others reading it again from L2 (group
  // passes would each stream a quarter of every line's neighbours, strided).
  // (Without groups a single row is already a whole-panel tile.)
  const bool by_rows = kGroups > 1 && M < kRowsOneByOneBelow;
  const int64_t passes = by_rows ? M : tiles * kGroups;  // tiles computed per panel
  // Each pass prefetches its share of the next panel, spread evenly over its depth steps (at
  // least half a line per step: a step then touches a line every other time).
  const int64_t share = next_bytes / passes;
  const int64_t step = next_bytes ? std::max<int64_t>(kLine / 2, share / K) : 0;
  if (by_rows) {
    for (int64_t m = 0; m < M; ++m)
      Tile<1, kPanelVectors>(x + m * K, K, panel, K, out + m * N + n0, N, columns,
                             next + m * share, step);
    return;
  }
  int64_t pass = 0;
  for (int64_t g = 0; g < kGroups && g * kGroupColumns < columns; ++g) {
    const float* group = panel + g * kGroupColumns;
    const int64_t c0 = n0 + g * kGroupColumns;
    const int64_t group_columns = std::min(kGroupColumns, n0 + columns - c0);
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows, ++pass)
      Tile<kTileRows, kGroupVectors>(x + m * K, K, group, K, out + m * N + c0, N,
                                     group_columns, next + pass * share, step);
    if (m < M)
      LastTile<kGroupVectors>(M - m, x + m * K, K, group, K, out + m * N + c0, N,
                              group_columns, next + pass++ * share, step);
  }
}

}  // namespace folojax

#endif  // FOLOJAX_PANEL_TILE_H_
