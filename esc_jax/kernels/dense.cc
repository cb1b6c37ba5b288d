// A dense layer y = x w + b on CPU (XLA FFI custom call `esc_dense`), for the layers too
// wide for the Swin-block kernels (esc_jax.kernels.dense).
#include "simd.h"

namespace {

// A dense layer on token-major rows: y (T, N) = x (T, K) w + b, w (K, N) as given or, with
// `transpose`, w given as (N, K) (x w^T: the input gradient of a dense layer). Rows go 16 at a
// time through `linear` (one pass over the packed weights per 16 rows; each output sums over
// k in order, so the result does not depend on the thread count); the weights are packed
// by the pool too, a panel per task.
constexpr int64_t kDenseGrain = 4;  // 16-row tiles per chunk

ffi::Error Dense(ffi::ThreadPool pool, F32 x, F32 w, F32 b, ffi::ResultBuffer<ffi::F32> y, bool has_bias,
                 bool transpose) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("dense: w must be 2-D");
  const int64_t n_in = transpose ? wd[1] : wd[0], n_out = transpose ? wd[0] : wd[1];
  if (n_in <= 0 || n_out <= 0 || x.element_count() % n_in != 0 || y->element_count() != x.element_count() / n_in * n_out ||
      (has_bias && b.element_count() != n_out))
    return ffi::Error::InvalidArgument("dense: shapes of x, w, b and y do not match");
  const int64_t rows = x.element_count() / n_in, tiles = (rows + kLanes - 1) / kLanes;
  const int ni = static_cast<int>(n_in), no = static_cast<int>(n_out);
  std::vector<float> pw(static_cast<size_t>(n_in) * n_out);
  const int64_t panels = (n_out + kBlock - 1) / kBlock;
  parallel_for(
      pool, panels, 8, [] { return 0; },
      [&](int&, int64_t begin, int64_t end) {
        pack_panels(w.typed_data(), ni, no, transpose, static_cast<int>(begin * kBlock),
                    static_cast<int>(std::min(n_out, end * kBlock)), pw.data());
      });
  const float* xs = x.typed_data();
  const float* bias = has_bias ? b.typed_data() : nullptr;
  float* ys = y->typed_data();
  struct Tile {
    std::unique_ptr<vf[]> in, out;
  };
  parallel_for(
      pool, tiles, kDenseGrain, [&] { return Tile{std::unique_ptr<vf[]>(new vf[ni]), std::unique_ptr<vf[]>(new vf[no])}; },
      [&](Tile& t, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, rows - i * kLanes));  // the last tile's may be fewer
          load_transposed(xs + i * kLanes * n_in, ni, t.in.get(), n);
          linear(t.in.get(), ni, pw.data(), bias, no, t.out.get());
          store_transposed(t.out.get(), no, ys + i * kLanes * n_out, n);
        }
      });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EscDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>() /* x (..., K) */
                                  .Arg<F32>() /* w (K, N), or (N, K) with transpose */
                                  .Arg<F32>() /* b (N,), with has_bias */
                                  .Ret<F32>() /* y (..., N) */
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("transpose"));
