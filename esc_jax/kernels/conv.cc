// A stride-1 convolution with "same" zero padding on CPU (XLA FFI custom call `esc_conv`):
// ESC's fused de-embedding (7 x 7, 45 -> 12 channels at ESC-Base's width), which XLA:CPU ran
// at ~40-60 GFLOP/s (esc_jax.kernels.conv_same).
//
// The input comes zero-padded and transposed, xt (B, H + KH - 1, C, Wp): along its last axis
// 16 neighbouring output columns' inputs lie together, so each (dy, c, dx) term of a tile of
// 16 outputs is one unaligned vector load, and the tile's sum is a `linear`-style pass over
// the packed weights (KH * C * KW inputs, in that order) without gathering an im2col matrix.
#include "simd.h"

namespace {

// w (KH, KW, C, N) (HWIO) into panels of kBlock outputs, each input k = (dy * C + c) * KW + dx
// holding its outputs together: pw[o * K + k * b + j], b the panel's width.
std::vector<float> pack_conv(const float* w, int kh, int kw, int c, int n) {
  const int k_all = kh * kw * c;
  std::vector<float> pw(static_cast<size_t>(k_all) * n);
  for (int o = 0; o < n; o += kBlock) {
    const int b = std::min(kBlock, n - o);
    float* panel = pw.data() + static_cast<int64_t>(o) * k_all;
    for (int dy = 0; dy < kh; ++dy)
      for (int ci = 0; ci < c; ++ci)
        for (int dx = 0; dx < kw; ++dx)
          for (int j = 0; j < b; ++j)
            panel[((dy * c + ci) * kw + dx) * b + j] = w[((static_cast<int64_t>(dy) * kw + dx) * c + ci) * n + o + j];
  }
  return pw;
}

// out[j] = sum over (dy, c, dx) of x[dy][c][dx : dx + 16] * panel[k][j] for j < OB: one tile's
// OB outputs; x points at the tile's first input row, rows of `wp` floats, C rows per dy.
template <int OB>
inline void conv_block(const float* x, int kh, int kw, int c, int64_t wp, const float* panel, vf* out) {
  vf acc[OB];
  for (int j = 0; j < OB; ++j) acc[j] = vf{};
  for (int dy = 0; dy < kh; ++dy)
    for (int ci = 0; ci < c; ++ci) {
      const float* row = x + (static_cast<int64_t>(dy) * c + ci) * wp;
      for (int dx = 0; dx < kw; ++dx, panel += OB) {
        const vf xk = load16(row + dx);
        for (int j = 0; j < OB; ++j) acc[j] += xk * panel[j];
      }
    }
  for (int j = 0; j < OB; ++j) out[j] = acc[j];
}

template <int OB>
inline void conv_tail(const float* x, int kh, int kw, int c, int64_t wp, const float* panel, int b, vf* out) {
  if constexpr (OB > 0) {
    if (b == OB) return conv_block<OB>(x, kh, kw, c, wp, panel, out);
    conv_tail<OB - 1>(x, kh, kw, c, wp, panel, b, out);
  }
}

ffi::Error Conv(ffi::ThreadPool pool, F32 xt, F32 w, F32 bias, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = xt.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv: xt, w and y must be 4-D");
  const int kh = static_cast<int>(wd[0]), kw = static_cast<int>(wd[1]), c = static_cast<int>(wd[2]);
  const int n = static_cast<int>(wd[3]);
  const int64_t batch = yd[0], h = yd[1], width = yd[2], tiles = (width + kLanes - 1) / kLanes, wp = xd[3];
  if (kh % 2 == 0 || kw % 2 == 0 || xd[0] != batch || xd[1] != h + kh - 1 || xd[2] != c ||
      wp < tiles * kLanes + kw - 1 || yd[3] != n || bias.element_count() != n)
    return ffi::Error::InvalidArgument("conv: shapes of xt, w, bias and y do not match");
  const std::vector<float> pw = pack_conv(w.typed_data(), kh, kw, c, n);
  const int64_t k_all = static_cast<int64_t>(kh) * kw * c;
  const float* xs = xt.typed_data();
  const float* b = bias.typed_data();
  float* ys = y->typed_data();
  parallel_for(
      pool, batch * h * tiles, 8, [&] { return std::unique_ptr<vf[]>(new vf[n]); },
      [&](std::unique_ptr<vf[]>& out, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t bh = i / tiles, tile = i % tiles, w0 = tile * kLanes;
          const float* x = xs + bh / h * (h + kh - 1) * c * wp + bh % h * c * wp + w0;
          int o = 0;
          for (; o + kBlock <= n; o += kBlock) conv_block<kBlock>(x, kh, kw, c, wp, pw.data() + o * k_all, out.get() + o);
          if (o < n) conv_tail<kBlock - 1>(x, kh, kw, c, wp, pw.data() + o * k_all, n - o, out.get() + o);
          for (int j = 0; j < n; ++j) out[j] += b[j];
          // The last tile of a row may hold fewer than 16 columns.
          store_transposed(out.get(), n, ys + (bh * width + w0) * n, static_cast<int>(std::min<int64_t>(kLanes, width - w0)));
        }
      });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EscConv, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>() /* xt (B, H + KH - 1, C, Wp), zero-padded */
                                  .Arg<F32>() /* w (KH, KW, C, N) */
                                  .Arg<F32>() /* bias (N,) */
                                  .Ret<F32>() /* y (B, H, W, N) */);
