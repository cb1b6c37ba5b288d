// Fused forward and backward of one Swin block on CPU (XLA FFI custom calls).
//
// A block is LayerNorm -> qkv -> window attention -> proj -> residual ->
// LayerNorm -> fc1 -> exact GELU -> fc2 -> residual. XLA runs it as ~20 passes
// over (tokens, C) arrays whose channel counts (45..384) are too narrow for its
// fusions and dots to keep the data in cache. Here each 4 x 4 window (16 tokens)
// goes through the whole block in L1/L2: its tokens sit in the 16 lanes of one
// vector per channel ("transposed" layout), so LayerNorm statistics, softmax and
// every matmul are vertical vector operations without shuffles.
//
// Inputs are float32, tokens in window order (esc_jax.layers.attention): x (B, L, C)
// with L = nW * 16. Weights are (in, out) as in the Flax parameters. The backward
// recomputes each window's forward, except qkv and fc1's output, which a training forward
// keeps (`save`) for it.
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
constexpr int kBlock = 16, kGradRows = 4;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float s) { return vf{} + s; }
inline void in_register(vf&) {}  // 32 registers: GCC keeps what it needs (see the AVX2 one)
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
constexpr int kBlock = 6, kGradRows = 4;
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
// Keeps v in registers where GCC would fold its reloads into every use (a load per FMA).
inline void in_register(vf& v) { __asm__("" : "+x"(v.lo), "+x"(v.hi)); }
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
std::vector<float> packed(const float* w, int n_in, int n_out, bool transpose = false) {
  std::vector<float> pw(static_cast<size_t>(n_in) * n_out);
  for (int o = 0; o < n_out; o += kBlock) {
    const int b = std::min(kBlock, n_out - o);
    float* panel = pw.data() + static_cast<int64_t>(o) * n_in;
    for (int k = 0; k < n_in; ++k)
      for (int j = 0; j < b; ++j)
        panel[k * b + j] = transpose ? w[static_cast<int64_t>(o + j) * n_in + k] : w[static_cast<int64_t>(k) * n_out + o + j];
  }
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

// LayerNorm over channels (two-pass statistics, eps 1e-5); keeps the mean and 1/std.
void layer_norm(const vf* x, int c, const float* g, const float* b, vf* out, vf& mean, vf& rstd) {
  vf s = {};
  for (int k = 0; k < c; ++k) s += x[k];
  mean = s * (1.0f / c);
  vf ss = {};
  for (int k = 0; k < c; ++k) {
    vf d = x[k] - mean;
    ss += d * d;
  }
  vf var = ss * (1.0f / c) + 1e-5f;
  rstd = 1.0f / vsqrt(var);  // correctly rounded, as 1 / sqrtf per lane
  for (int k = 0; k < c; ++k) out[k] = (x[k] - mean) * rstd * g[k] + b[k];
}

// LayerNorm's backward: adds rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy g,
// into dx, and dy xhat and dy into the scale / bias gradients.
void layer_norm_grad(const vf* x, const vf* dy, int c, const float* g, vf mean, vf rstd,
                     vf* dg, vf* db, vf* dx) {
  vf s1 = {}, s2 = {};
  for (int k = 0; k < c; ++k) {
    const vf xhat = (x[k] - mean) * rstd;
    const vf dxhat = dy[k] * g[k];
    dg[k] += dy[k] * xhat;
    db[k] += dy[k];
    s1 += dxhat;
    s2 += dxhat * xhat;
  }
  s1 *= 1.0f / c;
  s2 *= 1.0f / c;
  for (int k = 0; k < c; ++k) {
    const vf xhat = (x[k] - mean) * rstd;
    dx[k] += rstd * (dy[k] * g[k] - s1 - xhat * s2);
  }
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

// xt[k][i] = x[i * c + k]: a (16, c) row-major block into c vectors of 16 lanes.
void load_transposed(const float* x, int c, vf* xt) {
  for (int k0 = 0; k0 < c; k0 += kLanes) {
    const int n = std::min(kLanes, c - k0);
    vf r[kLanes];
    for (int i = 0; i < kLanes; ++i) r[i] = load_n(x + i * c + k0, n);
    transpose16(r);
    for (int k = 0; k < n; ++k) xt[k0 + k] = r[k];
  }
}

// The inverse of load_transposed: y[i * c + k] = yt[k][i].
void store_transposed(const vf* yt, int c, float* y) {
  for (int k0 = 0; k0 < c; k0 += kLanes) {
    const int n = std::min(kLanes, c - k0);
    vf r[kLanes];
    for (int k = 0; k < kLanes; ++k) r[k] = k < n ? yt[k0 + k] : vf{};
    transpose16(r);
    for (int i = 0; i < kLanes; ++i) store_n(y + i * c + k0, r[i], n);
  }
}

// Windows whose weight gradients are summed in one pass over each gradient matrix (see
// GradStash): the pass then serves 16 * kGradWindows tokens, where one pass per window
// read and wrote the whole matrix (L2-resident) for 16.
constexpr int kGradWindows = 4;

// acc[k0:k0+R] (rows of n_out) += sum over windows g < n_win and lanes (tokens) i of
// in[g * n_in + k][i] rows[g * 16 + i]: per element, the same additions in the same order
// as one window at a time.
template <int R>
inline void weight_grad_rows(const vf* in, int n_in, int k0, const vf* rows, int n_win, int n_out, int o0, int n,
                             float* acc) {
  vf a[R];
  for (int r = 0; r < R; ++r) a[r] = load_n(acc + static_cast<int64_t>(k0 + r) * n_out + o0, n);
  for (int g = 0; g < n_win; ++g) {
    const vf* x = in + g * n_in + k0;
#pragma GCC unroll 16  // constant indices keep a[] in registers
    for (int i = 0; i < kLanes; ++i) {
      vf row = rows[g * kLanes + i];
      in_register(row);
      for (int r = 0; r < R; ++r) a[r] += x[r][i] * row;
    }
  }
  for (int r = 0; r < R; ++r) store_n(acc + static_cast<int64_t>(k0 + r) * n_out + o0, a[r], n);
}

// acc (n_in, n_out) row-major += in^T gout over the 16 lanes (tokens) of n_win <= kGradWindows
// windows: a weight gradient. in is (n_win, n_in) vectors, gout (n_win, n_out).
void weight_grad(const vf* in, int n_in, const vf* gout, int n_out, int n_win, float* acc) {
  for (int o0 = 0; o0 < n_out; o0 += kLanes) {
    const int n = std::min(kLanes, n_out - o0);
    vf rows[kGradWindows * kLanes];  // rows[g * 16 + i] = gout[g][o0:o0+16][lane i]
    for (int g = 0; g < n_win; ++g) {
      vf* r = rows + g * kLanes;
      for (int j = 0; j < kLanes; ++j) r[j] = j < n ? gout[g * n_out + o0 + j] : vf{};
      transpose16(r);
    }
    int k = 0;
    for (; k + kGradRows <= n_in; k += kGradRows) weight_grad_rows<kGradRows>(in, n_in, k, rows, n_win, n_out, o0, n, acc);
    for (; k < n_in; ++k) weight_grad_rows<1>(in, n_in, k, rows, n_win, n_out, o0, n, acc);
  }
}

// The attention's small products, a few outputs at a time: each output is a chain of
// dependent FMAs, so one at a time waited on the FMA latency.
constexpr int kChains = 4;

// out[e] = sum over lanes j of a[j] * b[e][j], for e < n.
inline void contract_lanes(const vf* a, const vf* b, int n, vf* out) {
  int e = 0;
  for (; e + kChains <= n; e += kChains) {
    vf acc[kChains] = {};
    for (int j = 0; j < kLanes; ++j)
      for (int t = 0; t < kChains; ++t) acc[t] += a[j] * b[e + t][j];
    for (int t = 0; t < kChains; ++t) out[e + t] = acc[t];
  }
  for (; e < n; ++e) {
    vf acc = {};
    for (int j = 0; j < kLanes; ++j) acc += a[j] * b[e][j];
    out[e] = acc;
  }
}

// out[j] = sum over e < d of a[e] * b[e][j], for the 16 lanes j.
inline void contract_rows(const vf* a, const vf* b, int d, vf* out) {
  for (int j = 0; j < kLanes; j += kChains) {
    vf acc[kChains] = {};
    for (int e = 0; e < d; ++e)
      for (int t = 0; t < kChains; ++t) acc[t] += a[e] * b[e][j + t];
    for (int t = 0; t < kChains; ++t) out[j + t] = acc[t];
  }
}

struct Params {
  // wqkv, wproj, w1, w2: as given (n_in, n_out), then packed for `linear` (pack_weights).
  const float *ln1_g, *ln1_b, *wqkv, *bqkv, *pos, *wproj, *bproj;
  const float *ln2_g, *ln2_b, *w1, *b1, *w2, *b2;
  const float* real;  // (L,) 1/0 per token in window order, or null
  const float* mask;  // (nW, 16, 16) shift mask as [window][key][query], or null
  int c, hidden, heads;
  int64_t windows_per_item;
  // Backward only: the four matrices transposed to (n_out, n_in), packed.
  const float *wqkv_t, *wproj_t, *w1_t, *w2_t;
};

// The four matrices packed for `linear` (pack_weights points p's weights at them), and
// for the backward their transposes.
struct Packed {
  std::vector<float> wqkv, wproj, w1, w2, wqkv_t, wproj_t, w1_t, w2_t;
};

void pack_weights(Params& p, Packed& pk, bool transposes) {
  const int c = p.c, hd = p.hidden;
  if (transposes) {  // transposed (n_out, n_in) -> panels of (n_in rows of n_out)
    pk.wqkv_t = packed(p.wqkv, 3 * c, c, true), pk.wproj_t = packed(p.wproj, c, c, true);
    pk.w1_t = packed(p.w1, hd, c, true), pk.w2_t = packed(p.w2, c, hd, true);
    p.wqkv_t = pk.wqkv_t.data(), p.wproj_t = pk.wproj_t.data(), p.w1_t = pk.w1_t.data(), p.w2_t = pk.w2_t.data();
  }
  pk.wqkv = packed(p.wqkv, c, 3 * c), pk.wproj = packed(p.wproj, c, c);
  pk.w1 = packed(p.w1, c, hd), pk.w2 = packed(p.w2, hd, c);
  p.wqkv = pk.wqkv.data(), p.wproj = pk.wproj.data(), p.w1 = pk.w1.data(), p.w2 = pk.w2.data();
}

// v[k] *= the window's 1/0 real-token lanes, for k < C (p.real must be set).
inline void mask_padding(const Params& p, int64_t window, vf* v) {
  const vf real = load16(p.real + (window % p.windows_per_item) * kLanes);
  for (int k = 0; k < p.c; ++k) v[k] *= real;
}

// Per-window activations, each a run of vectors (lanes = the window's 16 tokens).
struct Work {
  vf *x, *xn1, *qkv, *probs, *att, *x1, *xn2, *h, *hg, *out;
  vf mean1, rstd1, mean2, rstd2;
  std::unique_ptr<vf[]> mem;

  Work(int c, int hidden, int heads) : mem(new vf[9 * c + 2 * hidden + heads * kLanes]) {
    x = mem.get(), xn1 = x + c, qkv = xn1 + c, att = qkv + 3 * c, x1 = att + c, xn2 = x1 + c;
    out = xn2 + c, h = out + c, hg = h + hidden, probs = hg + hidden;
  }
};

// Vectors a training forward keeps per window for the backward: the scaled qkv (3 C)
// and fc1's output (hidden), the two largest matmuls of the backward's recomputation.
inline int64_t saved_vectors(const Params& p) { return 3 * p.c + p.hidden; }

inline void store_vectors(const vf* v, int n, float* dst) {
  for (int k = 0; k < n; ++k) store16(dst + k * kLanes, v[k]);
}

inline void load_vectors(const float* src, int n, vf* v) {
  for (int k = 0; k < n; ++k) v[k] = load16(src + k * kLanes);
}

// The block's forward on one window (rows: its (16, C) tokens), into w.out; keeps every
// activation the backward needs in w (probabilities per head, GELU input and output).
// Without `out` it stops before fc2, which the backward does not need. `save` (the
// window's saved_vectors) receives qkv and fc1's output; with `saved` they are read
// from there instead of computed (the same values: they were computed so).
void forward_window(const float* rows, int64_t window, const Params& p, Work& w, bool out = true,
                    float* save = nullptr, const float* saved = nullptr) {
  const int c = p.c, d = c / p.heads;
  load_transposed(rows, c, w.x);
  layer_norm(w.x, c, p.ln1_g, p.ln1_b, w.xn1, w.mean1, w.rstd1);
  if (p.real != nullptr) mask_padding(p, window, w.xn1);
  if (saved != nullptr) {
    load_vectors(saved, 3 * c, w.qkv);
  } else {
    linear(w.xn1, c, p.wqkv, p.bqkv, 3 * c, w.qkv);
    const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(d));
    for (int e = 0; e < c; ++e) w.qkv[e] *= scale;  // q, scaled before its dot as in the original
  }
  if (save != nullptr) store_vectors(w.qkv, 3 * c, save);
  const float* mask =
      p.mask == nullptr ? nullptr : p.mask + (window % p.windows_per_item) * kLanes * kLanes;
  for (int head = 0; head < p.heads; ++head) {
    const vf* q = w.qkv + head * d;
    const vf* k = w.qkv + c + head * d;
    const vf* v = w.qkv + 2 * c + head * d;
    const float* pos = p.pos + head * kLanes * kLanes;
    vf* prob = w.probs + head * kLanes;  // prob[j][i]: query i's weight on key j
    contract_rows(q, k, d, prob);
    for (int j = 0; j < kLanes; ++j) {
      prob[j] += load16(pos + j * kLanes);
      if (mask != nullptr) prob[j] += load16(mask + j * kLanes);
    }
    vf m = prob[0];
    for (int j = 1; j < kLanes; ++j) m = vmax(prob[j], m);
    vf sum = {};
    for (int j = 0; j < kLanes; ++j) {
      prob[j] = vexp(prob[j] - m);
      sum += prob[j];
    }
    const vf inv = 1.0f / sum;
    for (int j = 0; j < kLanes; ++j) prob[j] *= inv;
    contract_lanes(prob, v, d, w.att + head * d);
  }
  linear(w.att, c, p.wproj, p.bproj, c, w.x1);
  for (int k = 0; k < c; ++k) w.x1[k] += w.x[k];
  layer_norm(w.x1, c, p.ln2_g, p.ln2_b, w.xn2, w.mean2, w.rstd2);
  if (saved != nullptr) {
    load_vectors(saved + 3 * c * kLanes, p.hidden, w.h);
  } else {
    linear(w.xn2, c, p.w1, p.b1, p.hidden, w.h);
  }
  if (save != nullptr) store_vectors(w.h, p.hidden, save + 3 * c * kLanes);
  for (int k = 0; k < p.hidden; ++k) w.hg[k] = vgelu(w.h[k]);
  if (!out) return;
  linear(w.hg, p.hidden, p.w2, p.b2, c, w.out);
  for (int k = 0; k < c; ++k) w.out[k] += w.x1[k];
}

// Gradient accumulators of one slot of windows: vectors are per-lane partial sums (reduced
// over the lanes at the end); matrices are (in, out) as the weights.
struct Grads {
  std::vector<vf> ln1_g, ln1_b, bqkv, bproj, ln2_g, ln2_b, b1, b2, pos;
  std::vector<float> wqkv, wproj, w1, w2;

  Grads(int c, int hidden, int heads)
      : ln1_g(c), ln1_b(c), bqkv(3 * c), bproj(c), ln2_g(c),
        ln2_b(c), b1(hidden), b2(c), pos(heads * kLanes), wqkv(3 * c * c), wproj(c * c),
        w1(c * hidden), w2(hidden * c) {}
};

// The inputs and output gradients of the four matmuls of up to kGradWindows windows, kept
// until their weight gradients are summed together (flush). backward_window computes the
// output gradients dL/dy, dh and dqkv in their slots (`at`) and copies the rest in (`keep`).
struct GradStash {
  int c, hidden, n = 0;  // n: windows held
  std::unique_ptr<vf[]> mem;
  vf *hg, *gy, *xn2, *dh, *att, *dx1, *xn1, *dqkv;  // each (kGradWindows, its size)

  GradStash(int c, int hidden) : c(c), hidden(hidden), mem(new vf[kGradWindows * (8 * c + 2 * hidden)]) {
    hg = mem.get(), gy = hg + kGradWindows * hidden, xn2 = gy + kGradWindows * c;
    dh = xn2 + kGradWindows * c, att = dh + kGradWindows * hidden, dx1 = att + kGradWindows * c;
    xn1 = dx1 + kGradWindows * c, dqkv = xn1 + kGradWindows * c;
  }
  // Window n's place in dst, a field of `size` vectors per window.
  vf* at(vf* dst, int size) const { return dst + n * size; }
  // Copies v[0:size] into window n's place in dst.
  void keep(vf* dst, const vf* v, int size) const { std::copy_n(v, size, at(dst, size)); }
  // Adds the held windows' weight gradients into gr.
  void flush(Grads& gr) {
    weight_grad(hg, hidden, gy, c, n, gr.w2.data());
    weight_grad(xn2, c, dh, hidden, n, gr.w1.data());
    weight_grad(att, c, dx1, c, n, gr.wproj.data());
    weight_grad(xn1, c, dqkv, 3 * c, n, gr.wqkv.data());
    n = 0;
  }
};

// The block's backward on one window: recomputes the forward (qkv and fc1's output read
// from `saved` where the forward kept them), then adds the parameter gradients into gr (the
// weights' through st) and writes the input gradient rows (16, C) to drows. buf holds
// 3 C vectors.
void backward_window(const float* rows, const float* grows, float* drows, int64_t window,
                     const Params& p, Work& w, Grads& gr, GradStash& st, vf* buf, const float* saved) {
  const int c = p.c, hd = p.hidden, d = c / p.heads;
  forward_window(rows, window, p, w, /*out=*/false, nullptr, saved);
  vf* gy = st.at(st.gy, c);            // C: dL/dy
  vf* dh = st.at(st.dh, hd);           // hidden
  vf* dqkv = st.at(st.dqkv, 3 * c);    // 3C
  vf* dx1 = buf;                       // C
  vf* dn = dx1 + c;                    // C: gradient of a LayerNorm output
  vf* datt = dn + c;                   // C
  load_transposed(grows, c, gy);
  // y = x1 + gelu(xn2 W1 + b1) W2 + b2
  for (int k = 0; k < c; ++k) gr.b2[k] += gy[k];
  st.keep(st.hg, w.hg, hd);
  linear(gy, c, p.w2_t, nullptr, hd, dh);
  for (int k = 0; k < hd; ++k) dh[k] *= vgelu_grad(w.h[k]);
  for (int k = 0; k < hd; ++k) gr.b1[k] += dh[k];
  st.keep(st.xn2, w.xn2, c);
  linear(dh, hd, p.w1_t, nullptr, c, dn);
  for (int k = 0; k < c; ++k) dx1[k] = gy[k];
  layer_norm_grad(w.x1, dn, c, p.ln2_g, w.mean2, w.rstd2, gr.ln2_g.data(), gr.ln2_b.data(), dx1);
  // x1 = x + att Wproj + bproj
  for (int k = 0; k < c; ++k) gr.bproj[k] += dx1[k];
  st.keep(st.att, w.att, c);
  st.keep(st.dx1, dx1, c);
  linear(dx1, c, p.wproj_t, nullptr, c, datt);
  // Attention per head, with prob[j][i] (lanes: queries i) and k, v[e][j] (lanes: keys j).
  const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(d));
  for (int head = 0; head < p.heads; ++head) {
    const vf* q = w.qkv + head * d;  // scaled
    const vf* k = w.qkv + c + head * d;
    const vf* v = w.qkv + 2 * c + head * d;
    const vf* prob = w.probs + head * kLanes;
    const vf* dout = datt + head * d;
    vf* dq = dqkv + head * d;
    vf* dk = dqkv + c + head * d;
    vf* dv = dqkv + 2 * c + head * d;
    vf pt[kLanes];  // pt[i][j] = prob[j][i]
    for (int j = 0; j < kLanes; ++j) pt[j] = prob[j];
    transpose16(pt);
    contract_lanes(pt, dout, d, dv);  // dv[e][j] = sum_i prob[j][i] dout[e][i]
    vf ds[kLanes];  // dlogits, [j][i]
    contract_rows(dout, v, d, ds);  // dprob[j][i] = sum_e dout[e][i] v[e][j]
    vf dot = {};
    for (int j = 0; j < kLanes; ++j) dot += ds[j] * prob[j];
    vf* dpos = gr.pos.data() + head * kLanes;
    for (int j = 0; j < kLanes; ++j) {
      ds[j] = prob[j] * (ds[j] - dot);  // softmax's backward
      dpos[j] += ds[j];
    }
    contract_lanes(ds, k, d, dq);  // dq[e][i] = sum_j ds[j][i] k[e][j], then the scale
    for (int e = 0; e < d; ++e) dq[e] *= scale;
    transpose16(ds);  // ds[i][j]
    contract_lanes(ds, q, d, dk);  // dk[e][j] = sum_i ds[i][j] q[e][i]
  }
  // qkv = xn1 Wqkv + bqkv; xn1 = LayerNorm(x) * real
  for (int k = 0; k < 3 * c; ++k) gr.bqkv[k] += dqkv[k];
  st.keep(st.xn1, w.xn1, c);
  if (++st.n == kGradWindows) st.flush(gr);
  linear(dqkv, 3 * c, p.wqkv_t, nullptr, c, dn);
  if (p.real != nullptr) mask_padding(p, window, dn);
  layer_norm_grad(w.x, dn, c, p.ln1_g, w.mean1, w.rstd1, gr.ln1_g.data(), gr.ln1_b.data(), dx1);
  store_transposed(dx1, c, drows);
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

// Checks the shapes against x (B, nW * 16, C) and fills p's pointers (no transposes).
ffi::Error make_params(const F32& x, const F32& real, const F32& mask, const F32& ln1_g,
                       const F32& ln1_b, const F32& wqkv, const F32& bqkv, const F32& pos,
                       const F32& wproj, const F32& bproj, const F32& ln2_g, const F32& ln2_b,
                       const F32& w1, const F32& b1, const F32& w2, const F32& b2, int64_t heads,
                       bool has_real, bool has_mask, Params& p) {
  auto dims = x.dimensions();
  if (dims.size() != 3 || dims[1] % kLanes != 0)
    return ffi::Error::InvalidArgument("swin block: x must be (B, nW * 16, C)");
  const int64_t tokens = dims[1], c = dims[2];
  const int64_t hidden = w1.element_count() / std::max<int64_t>(c, 1);
  if (c <= 0 || heads <= 0 || c % heads != 0)
    return ffi::Error::InvalidArgument("swin block: C must be a positive multiple of heads");
  if (wqkv.element_count() != 3 * c * c || bqkv.element_count() != 3 * c ||
      wproj.element_count() != c * c || bproj.element_count() != c || w1.element_count() != c * hidden ||
      b1.element_count() != hidden || w2.element_count() != hidden * c || b2.element_count() != c ||
      ln1_g.element_count() != c || ln1_b.element_count() != c || ln2_g.element_count() != c ||
      ln2_b.element_count() != c || pos.element_count() != heads * kLanes * kLanes ||
      (has_real && real.element_count() != tokens) ||
      (has_mask && mask.element_count() != tokens * kLanes))
    return ffi::Error::InvalidArgument("swin block: parameter shapes do not match x");
  p = Params{ln1_g.typed_data(), ln1_b.typed_data(), wqkv.typed_data(), bqkv.typed_data(),
             pos.typed_data(),   wproj.typed_data(), bproj.typed_data(), ln2_g.typed_data(),
             ln2_b.typed_data(), w1.typed_data(),    b1.typed_data(),    w2.typed_data(),
             b2.typed_data(),    has_real ? real.typed_data() : nullptr,
             has_mask ? mask.typed_data() : nullptr, static_cast<int>(c),
             static_cast<int>(hidden), static_cast<int>(heads), tokens / kLanes,
             nullptr, nullptr, nullptr, nullptr};
  return ffi::Error::Success();
}

constexpr int64_t kGrain = 64;       // windows per chunk of forward work
// Slots of backward work (see SwinBlockBwd): at most this many threads share a backward
// call; more slots cost more gradient buffers to zero and add.
constexpr int64_t kGradSlots = 16;

ffi::Error SwinBlockFwd(ffi::ThreadPool pool, F32 x, F32 real, F32 mask, F32 ln1_g, F32 ln1_b,
                        F32 wqkv, F32 bqkv, F32 pos, F32 wproj, F32 bproj, F32 ln2_g, F32 ln2_b,
                        F32 w1, F32 b1, F32 w2, F32 b2, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> saved, int64_t heads, bool has_real,
                        bool has_mask, bool save) {
  Params p;
  ffi::Error err = make_params(x, real, mask, ln1_g, ln1_b, wqkv, bqkv, pos, wproj, bproj, ln2_g,
                               ln2_b, w1, b1, w2, b2, heads, has_real, has_mask, p);
  if (err.failure()) return err;
  const int64_t c = p.c, windows = x.element_count() / (kLanes * c);
  const int64_t per_window = saved_vectors(p) * kLanes;
  if (save && saved->element_count() != windows * per_window)
    return ffi::Error::InvalidArgument("swin block: the saved activations' size does not match x");
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  float* keep = save ? saved->typed_data() : nullptr;
  Packed pk;
  pack_weights(p, pk, /*transposes=*/false);
  parallel_for(
      pool, windows, kGrain, [&] { return Work(p.c, p.hidden, p.heads); },
      [&](Work& w, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          forward_window(xs + i * kLanes * c, i, p, w, true, keep == nullptr ? nullptr : keep + i * per_window);
          store_transposed(w.out, p.c, ys + i * kLanes * c);
        }
      });
  return ffi::Error::Success();
}

float lane_sum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

ffi::Error SwinBlockBwd(ffi::ThreadPool pool, F32 x, F32 g, F32 saved, F32 real, F32 mask, F32 ln1_g,
                        F32 ln1_b, F32 wqkv, F32 bqkv, F32 pos, F32 wproj, F32 bproj, F32 ln2_g,
                        F32 ln2_b, F32 w1, F32 b1, F32 w2, F32 b2,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> d_ln1_g,
                        ffi::ResultBuffer<ffi::F32> d_ln1_b, ffi::ResultBuffer<ffi::F32> d_wqkv,
                        ffi::ResultBuffer<ffi::F32> d_bqkv, ffi::ResultBuffer<ffi::F32> d_pos,
                        ffi::ResultBuffer<ffi::F32> d_wproj, ffi::ResultBuffer<ffi::F32> d_bproj,
                        ffi::ResultBuffer<ffi::F32> d_ln2_g, ffi::ResultBuffer<ffi::F32> d_ln2_b,
                        ffi::ResultBuffer<ffi::F32> d_w1, ffi::ResultBuffer<ffi::F32> d_b1,
                        ffi::ResultBuffer<ffi::F32> d_w2, ffi::ResultBuffer<ffi::F32> d_b2,
                        int64_t heads, bool has_real, bool has_mask, bool has_saved) {
  Params p;
  ffi::Error err = make_params(x, real, mask, ln1_g, ln1_b, wqkv, bqkv, pos, wproj, bproj, ln2_g,
                               ln2_b, w1, b1, w2, b2, heads, has_real, has_mask, p);
  if (err.failure()) return err;
  if (g.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("swin block: the cotangent's shape differs from x");
  const int64_t per_window = saved_vectors(p) * kLanes;
  if (has_saved && saved.element_count() != x.element_count() / (kLanes * p.c) * per_window)
    return ffi::Error::InvalidArgument("swin block: the saved activations' size does not match x");
  const float* kept = has_saved ? saved.typed_data() : nullptr;
  const int c = p.c, hd = p.hidden;
  Packed pk;
  pack_weights(p, pk, /*transposes=*/true);
  ffi::ResultBuffer<ffi::F32>* outs[] = {&d_ln1_g, &d_ln1_b, &d_wqkv, &d_bqkv, &d_pos, &d_wproj, &d_bproj,
                                         &d_ln2_g, &d_ln2_b, &d_w1,   &d_b1,   &d_w2,  &d_b2};
  for (auto* o : outs) std::fill_n((*o)->typed_data(), (*o)->element_count(), 0.0f);
  const int64_t windows = x.element_count() / (kLanes * c);
  const float *xs = x.typed_data(), *gs = g.typed_data();
  float* dxs = dx->typed_data();
  // Windows are split into a fixed number of contiguous slots, each summing its own
  // gradients in window order; the slots are then added in order. So the result does not
  // depend on the thread count or on which thread ran what (exact resume of training).
  const int64_t slots = std::min(kGradSlots, windows);
  // A worker's scratch, reused across its slots.
  struct Scratch {
    Work w;
    GradStash st;
    std::unique_ptr<vf[]> buf;
  };
  std::vector<std::unique_ptr<Grads>> done(slots);
  parallel_for(
      pool, slots, 1,
      [&] { return Scratch{Work(c, hd, p.heads), GradStash(c, hd), std::unique_ptr<vf[]>(new vf[3 * c])}; },
      [&](Scratch& l, int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          done[s].reset(new Grads(c, hd, p.heads));
          for (int64_t i = s * windows / slots; i < (s + 1) * windows / slots; ++i)
            backward_window(xs + i * kLanes * c, gs + i * kLanes * c, dxs + i * kLanes * c, i, p, l.w, *done[s],
                            l.st, l.buf.get(), kept == nullptr ? nullptr : kept + i * per_window);
          l.st.flush(*done[s]);
        }
      });
  auto add_vectors = [](const std::vector<vf>& src, float* dst) {
    for (size_t k = 0; k < src.size(); ++k) dst[k] += lane_sum(src[k]);
  };
  auto add_floats = [](const std::vector<float>& src, float* dst) {
    for (size_t k = 0; k < src.size(); ++k) dst[k] += src[k];
  };
  for (const auto& slot : done) {
    const Grads& gr = *slot;
    add_vectors(gr.ln1_g, d_ln1_g->typed_data());
    add_vectors(gr.ln1_b, d_ln1_b->typed_data());
    add_floats(gr.wqkv, d_wqkv->typed_data());
    add_vectors(gr.bqkv, d_bqkv->typed_data());
    float* dpos = d_pos->typed_data();  // [head][key j][query i], as pos
    for (size_t hj = 0; hj < gr.pos.size(); ++hj)
      for (int i = 0; i < kLanes; ++i) dpos[hj * kLanes + i] += gr.pos[hj][i];
    add_floats(gr.wproj, d_wproj->typed_data());
    add_vectors(gr.bproj, d_bproj->typed_data());
    add_vectors(gr.ln2_g, d_ln2_g->typed_data());
    add_vectors(gr.ln2_b, d_ln2_b->typed_data());
    add_floats(gr.w1, d_w1->typed_data());
    add_vectors(gr.b1, d_b1->typed_data());
    add_floats(gr.w2, d_w2->typed_data());
    add_vectors(gr.b2, d_b2->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

#define ESC_PARAM_ARGS                                                                       \
  .Arg<F32>()      /* real */                                                                \
      .Arg<F32>()  /* mask [window][key][query] */                                           \
      .Arg<F32>()  /* ln1 scale */                                                           \
      .Arg<F32>()  /* ln1 bias */                                                            \
      .Arg<F32>()  /* qkv kernel */                                                          \
      .Arg<F32>()  /* qkv bias */                                                            \
      .Arg<F32>()  /* position bias [head][key][query] */                                    \
      .Arg<F32>()  /* proj kernel */                                                         \
      .Arg<F32>()  /* proj bias */                                                           \
      .Arg<F32>()  /* ln2 scale */                                                           \
      .Arg<F32>()  /* ln2 bias */                                                            \
      .Arg<F32>()  /* fc1 kernel */                                                          \
      .Arg<F32>()  /* fc1 bias */                                                            \
      .Arg<F32>()  /* fc2 kernel */                                                          \
      .Arg<F32>()  /* fc2 bias */

#define ESC_ATTRS .Attr<int64_t>("heads").Attr<bool>("has_real").Attr<bool>("has_mask")

XLA_FFI_DEFINE_HANDLER_SYMBOL(EscSwinBlockFwd, SwinBlockFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>() /* x */
                                  ESC_PARAM_ARGS
                                  .Ret<F32>() /* y */
                                  .Ret<F32>() /* saved activations (with save; else unused) */
                                  ESC_ATTRS.Attr<bool>("save"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EscSwinBlockBwd, SwinBlockBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>() /* x */
                                  .Arg<F32>() /* dL/dy */
                                  .Arg<F32>() /* the forward's saved activations (with has_saved) */
                                  ESC_PARAM_ARGS
                                  .Ret<F32>() /* dL/dx */
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>() /* the parameters' gradients, in the arguments' order */
                                  ESC_ATTRS.Attr<bool>("has_saved"));
