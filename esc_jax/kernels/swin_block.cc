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
#include "simd.h"

namespace {

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

// Windows whose weight gradients are summed in one pass over each gradient matrix (see
// GradStash): the pass then serves 16 * kGradWindows tokens, where one pass per window
// read and wrote the whole matrix (L2-resident) for 16.
constexpr int kGradWindows = 4;

// acc[k0:k0+R] (rows of n_out) += sum over windows g < n_win and lanes (tokens) i of
// in[g * n_in + k][i] rows[g * 16 + i]: per element, the same additions in the same order
// as one window at a time. The R accumulators stay in registers: a deeper unroll of the
// token loop made GCC spill them around every FMA.
template <int R>
inline void weight_grad_rows(const vf* in, int n_in, int k0, const vf* rows, int n_win, int n_out, int o0, int n,
                             float* acc) {
  vf a[R];
  for (int r = 0; r < R; ++r) a[r] = load_n(acc + static_cast<int64_t>(k0 + r) * n_out + o0, n);
  for (int g = 0; g < n_win; ++g) {
    const float* x = reinterpret_cast<const float*>(in + g * n_in + k0);  // x[r * 16 + i]: row k0 + r, token i
    const vf* gw = rows + g * kLanes;
#pragma GCC unroll 2
    for (int i = 0; i < kLanes; ++i) {
      const vf row = gw[i];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] += x[r * kLanes + i] * row;
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
