// Shared by the CPU kernels (swin_block.cc, dense.cc): 16-lane float vectors (one AVX-512
// register, or two AVX2 halves), their math (exp, erf, GELU), the packed matmul `linear` over
// 16 tokens at a time, 16 x 16 transposes between token rows and vectors, and a parallel loop
// on XLA's thread pool. Everything is in an anonymous namespace: each kernel file compiles
// its own copy.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // tokens per window (4 x 4)

// One vector holds a value for each of a window's 16 tokens. With AVX-512 it is one
// register. With AVX2 it is two 8-lane halves: GCC keeps a 64-byte vector type in memory
// when the target has no 64-byte registers, which made every operation a store and reload.
// kBlock: outputs per pass of `linear` (its accumulators fill the registers). kGradRows: rows
// of a weight gradient updated per load of a token's output-gradient vector.
#if defined(__AVX512F__)
constexpr int kBlock = 16, kGradRows = 8;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float s) { return vf{} + s; }
// NaN in `a` propagates (as in XLA), so a clamp of NaN stays NaN.
inline vf vmax(vf a, vf b) { return a < b ? b : a; }
inline vf vmin(vf a, vf b) { return a > b ? b : a; }
// 2^n for integral n in [-126, 127].
inline vf pow2i(vf n) {
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline vf vsqrt(vf x) { return reinterpret_cast<vf>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x))); }
inline vf load16(const float* src) { return reinterpret_cast<vf>(_mm512_loadu_ps(src)); }
inline void store16(float* dst, vf v) { _mm512_storeu_ps(dst, reinterpret_cast<__m512>(v)); }
// 1 / q to ~2^-28 relative: rcp14 and one Newton step.
inline vf reciprocal(vf q) {
  vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(q)));
  return r * (2.0f - q * r);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kBlock = 6, kGradRows = 6;
typedef float vh __attribute__((vector_size(32)));  // half a vector: one AVX register
typedef int32_t vhi __attribute__((vector_size(32)));

struct vf {
  vh lo, hi;  // lanes 0-7, 8-15
  // GCC vector types alias their element type, so lanes may be read as floats.
  float operator[](int l) const { return reinterpret_cast<const float*>(this)[l]; }
};
#define ESC_VF_OP(op)                                                                     \
  inline vf operator op(vf a, vf b) { return {a.lo op b.lo, a.hi op b.hi}; }              \
  inline vf operator op(vf a, float s) { return {a.lo op s, a.hi op s}; }                 \
  inline vf operator op(float s, vf b) { return {s op b.lo, s op b.hi}; }                 \
  inline vf& operator op##=(vf& a, vf b) { return a = a op b; }                           \
  inline vf& operator op##=(vf& a, float s) { return a = a op s; }
ESC_VF_OP(+)
ESC_VF_OP(-)
ESC_VF_OP(*)
ESC_VF_OP(/)
#undef ESC_VF_OP

inline vf splat(float s) { return vf{} + s; }
inline vf vmax(vf a, vf b) { return {a.lo < b.lo ? b.lo : a.lo, a.hi < b.hi ? b.hi : a.hi}; }
inline vf vmin(vf a, vf b) { return {a.lo > b.lo ? b.lo : a.lo, a.hi > b.hi ? b.hi : a.hi}; }
inline vh pow2i(vh n) {
  vhi bits = (__builtin_convertvector(n, vhi) + 127) << 23;
  vh out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline vf pow2i(vf n) { return {pow2i(n.lo), pow2i(n.hi)}; }
inline vh vsqrt(vh x) { return reinterpret_cast<vh>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x))); }
inline vf vsqrt(vf x) { return {vsqrt(x.lo), vsqrt(x.hi)}; }
// (A memcpy into the struct went through the stack.)
inline vf load16(const float* src) {
  return {reinterpret_cast<vh>(_mm256_loadu_ps(src)), reinterpret_cast<vh>(_mm256_loadu_ps(src + 8))};
}
inline void store16(float* dst, vf v) {
  _mm256_storeu_ps(dst, reinterpret_cast<__m256>(v.lo));
  _mm256_storeu_ps(dst + 8, reinterpret_cast<__m256>(v.hi));
}
// 1 / q to ~2^-22 relative: rcp (12 bits) and one Newton step.
inline vh reciprocal(vh q) {
  vh r = reinterpret_cast<vh>(_mm256_rcp_ps(reinterpret_cast<__m256>(q)));
  return r * (2.0f - q * r);
}
inline vf reciprocal(vf q) { return {reciprocal(q.lo), reciprocal(q.hi)}; }
#else
#error "the fused kernels need x86-64 with AVX2 and FMA, or AVX-512"
#endif

// exp(x) to ~1 ulp: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial).
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2i(n);
}


// erf(z) = z P(z^2) / Q(z^2) on |z| <= 4 (a rational fit, |error| < 1e-7 before float32
// rounding); erf(4) is 1 to float32 precision, so z is clamped there.
inline vf verf(vf z) {
  z = vmin(vmax(z, splat(-4.0f)), splat(4.0f));
  vf z2 = z * z;
  vf p = splat(2.027286572973768e-06f);
  p = p * z2 + 2.861879973585721e-04f;
  p = p * z2 + 3.844706279541621e-03f;
  p = p * z2 + 5.298176301916458e-02f;
  p = p * z2 + 1.923081935180319e-01f;
  p = p * z2 + 1.128379046143427e+00f;
  vf q = splat(3.79285560665006e-05f);
  q = q * z2 + 1.1810574145155073e-03f;
  q = q * z2 + 1.512442889335951e-02f;
  q = q * z2 + 1.1487953582826385e-01f;
  q = q * z2 + 5.037605983877743e-01f;
  q = q * z2 + 1.0f;
  return z * p * reciprocal(q);
}

constexpr float kSqrtHalf = 0.70710678118654752f;

// Exact GELU 0.5 x (1 + erf(x / sqrt 2)) and its derivative Phi(x) + x phi(x).
inline vf vgelu(vf x) { return 0.5f * x * (1.0f + verf(x * kSqrtHalf)); }
inline vf vgelu_grad(vf x) {
  return 0.5f * (1.0f + verf(x * kSqrtHalf)) + x * (0.39894228040143268f * vexp(-0.5f * x * x));
}

// Weights are packed for `linear` into column panels: the outputs o..o+b-1 (b = kBlock, or
// what is left at the end) of every input k lie together, at pw[o * n_in + k * b + j]. A
// pass over one panel then reads its weights in order, instead of one cache line per input.
// w is (n_in, n_out) row-major, or (n_out, n_in) with `transpose`.
// pack_panels packs the panels of outputs [o_begin, o_end) (o_begin a multiple of kBlock)
// into pw, which holds the whole packed matrix.
void pack_panels(const float* w, int n_in, int n_out, bool transpose, int o_begin, int o_end, float* pw) {
  for (int o = o_begin; o < o_end; o += kBlock) {
    const int b = std::min(kBlock, n_out - o);
    float* panel = pw + static_cast<int64_t>(o) * n_in;
    for (int k = 0; k < n_in; ++k)
      for (int j = 0; j < b; ++j)
        panel[k * b + j] = transpose ? w[static_cast<int64_t>(o + j) * n_in + k] : w[static_cast<int64_t>(k) * n_out + o + j];
  }
}

std::vector<float> packed(const float* w, int n_in, int n_out, bool transpose = false) {
  std::vector<float> pw(static_cast<size_t>(n_in) * n_out);
  pack_panels(w, n_in, n_out, transpose, 0, n_out, pw.data());
  return pw;
}

// out[o + j] = bias[o + j] + sum_k in[k] * panel[k * OB + j] for j < OB; bias may be null.
template <int OB>
inline void linear_block(const vf* in, int n_in, const float* panel, const float* bias, vf* out) {
  vf acc[OB];
  for (int j = 0; j < OB; ++j) acc[j] = vf{};
  for (int k = 0; k < n_in; ++k) {
    const vf xk = in[k];
    const float* wk = panel + k * OB;
    for (int j = 0; j < OB; ++j) acc[j] += xk * wk[j];
  }
  for (int j = 0; j < OB; ++j) out[j] = bias == nullptr ? acc[j] : acc[j] + bias[j];
}

template <int OB>
inline void linear_tail(const vf* in, int n_in, const float* panel, const float* bias, int b, vf* out) {
  if constexpr (OB > 0) {
    if (b == OB) return linear_block<OB>(in, n_in, panel, bias, out);
    linear_tail<OB - 1>(in, n_in, panel, bias, b, out);
  }
}

// out[o] = bias[o] + sum_k in[k] * w[k, o] for o < n_out, with w packed (see `packed`).
void linear(const vf* in, int n_in, const float* pw, const float* bias, int n_out, vf* out) {
  int o = 0;
  for (; o + kBlock <= n_out; o += kBlock)
    linear_block<kBlock>(in, n_in, pw + static_cast<int64_t>(o) * n_in, bias == nullptr ? nullptr : bias + o, out + o);
  if (o < n_out)
    linear_tail<kBlock - 1>(in, n_in, pw + static_cast<int64_t>(o) * n_in, bias == nullptr ? nullptr : bias + o,
                            n_out - o, out + o);
}

#if !defined(__AVX512F__)
// In-place transpose of an 8 x 8 block of floats.
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      u[4 * i + 2 * j] = _mm256_shuffle_ps(t[4 * i + j], t[4 * i + j + 2], 0x44);
      u[4 * i + 2 * j + 1] = _mm256_shuffle_ps(t[4 * i + j], t[4 * i + j + 2], 0xee);
    }
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}
#endif

// In-place transpose of a 16 x 16 block held as 16 vectors: r[a][b] <- r[b][a].
inline void transpose16(vf* r) {
#if defined(__AVX512F__)
  __m512 t[16], u[16];
  for (int i = 0; i < 16; ++i) u[i] = reinterpret_cast<__m512>(r[i]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      __m512d lo = _mm512_castps_pd(t[4 * i + j]), hi = _mm512_castps_pd(t[4 * i + j + 2]);
      u[4 * i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      u[4 * i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = reinterpret_cast<vf>(_mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    r[8 + j] = reinterpret_cast<vf>(_mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
  }
#else
  // Four 8 x 8 transposes: [rows 0-7 | rows 8-15] x [lo | hi].
  __m256 q[4][8];
  for (int i = 0; i < 8; ++i) {
    q[0][i] = reinterpret_cast<__m256>(r[i].lo), q[1][i] = reinterpret_cast<__m256>(r[i].hi);
    q[2][i] = reinterpret_cast<__m256>(r[8 + i].lo), q[3][i] = reinterpret_cast<__m256>(r[8 + i].hi);
  }
  for (auto& m : q) transpose8(m);
  for (int j = 0; j < 8; ++j) {
    r[j] = {reinterpret_cast<vh>(q[0][j]), reinterpret_cast<vh>(q[2][j])};
    r[8 + j] = {reinterpret_cast<vh>(q[1][j]), reinterpret_cast<vh>(q[3][j])};
  }
#endif
}

#if !defined(__AVX512F__)
// The mask of lanes first..first+7 (one half) that are below n.
inline __m256i lanes_below(int n, int first) {
  const vhi lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return reinterpret_cast<__m256i>(lane + first < n);
}
#endif

// The first n <= 16 floats at src as a vector (zeros after them), and the inverse.
inline vf load_n(const float* src, int n) {
  if (n == kLanes) return load16(src);
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src));
#else
  return {reinterpret_cast<vh>(_mm256_maskload_ps(src, lanes_below(n, 0))),
          reinterpret_cast<vh>(_mm256_maskload_ps(src + 8, lanes_below(n, 8)))};
#endif
}

inline void store_n(float* dst, vf v, int n) {
  if (n == kLanes) return store16(dst, v);
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
#else
  _mm256_maskstore_ps(dst, lanes_below(n, 0), reinterpret_cast<__m256>(v.lo));
  _mm256_maskstore_ps(dst + 8, lanes_below(n, 8), reinterpret_cast<__m256>(v.hi));
#endif
}

// xt[k][i] = x[i * c + k]: a (16, c) row-major block into c vectors of 16 lanes. With
// rows < 16 only the first `rows` rows are read; lanes past them are zero.
void load_transposed(const float* x, int c, vf* xt, int rows = kLanes) {
  for (int k0 = 0; k0 < c; k0 += kLanes) {
    const int n = std::min(kLanes, c - k0);
    vf r[kLanes];
    for (int i = 0; i < kLanes; ++i) r[i] = i < rows ? load_n(x + i * c + k0, n) : vf{};
    transpose16(r);
    for (int k = 0; k < n; ++k) xt[k0 + k] = r[k];
  }
}

// The inverse of load_transposed: y[i * c + k] = yt[k][i], for the first `rows` rows i.
void store_transposed(const vf* yt, int c, float* y, int rows = kLanes) {
  for (int k0 = 0; k0 < c; k0 += kLanes) {
    const int n = std::min(kLanes, c - k0);
    vf r[kLanes];
    for (int k = 0; k < kLanes; ++k) r[k] = k < n ? yt[k0 + k] : vf{};
    transpose16(r);
    for (int i = 0; i < rows; ++i) store_n(y + i * c + k0, r[i], n);
  }
}

// Runs fn(local, begin, end) over [0, n) in chunks of `grain` on the calling thread and the
// pool; each worker makes its own scratch `local = make()` before its first chunk. Chunks
// are claimed from an atomic counter and the call returns once every claimed chunk is done
// and its worker has stopped, so a task that starts late finds nothing left and touches
// nothing of the caller's.
template <typename Make, typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t grain, Make&& make, Fn&& fn) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  if (helpers <= 0) {
    auto local = make();
    fn(local, int64_t{0}, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, left{0}, active{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->left = chunks;
  auto work = [state, chunks, grain, n, &make, &fn]() {
    state->active.fetch_add(1);
    int64_t i = state->next.fetch_add(1);
    if (i < chunks) {
      auto local = make();
      do {
        fn(local, i * grain, std::min(n, (i + 1) * grain));
        state->left.fetch_sub(1);
      } while ((i = state->next.fetch_add(1)) < chunks);
    }
    if (state->active.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->left.load() == 0 && state->active.load() == 0; });
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace
