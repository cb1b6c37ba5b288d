"""ESC: Swin encoder, cross-scale residual VQ decoder, encode/decode.

Parameter tree (mirrors the PyTorch module names; list index i -> `name_i`):
  encoder/{patch_embed, pre_nn, blocks_i}
  decoder/{blocks_i, post_nn, patch_deembed}
  quantizers_i/{vqs_m/embedding, down_projs_m, up_projs_m}
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from esc_jax import audio
from esc_jax.layers.attention import TransformerLayer
from esc_jax.layers.scale import PatchDeEmbed, PatchEmbed
from esc_jax.quantize import ProductVQ


def _tokens(x):
  """(B, H, W, C) -> (B, H*W, C), the original's row-major token layout."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


class Encoder(nn.Module):
  """PatchEmbed -> pre_nn -> len(h_dims)-1 downscaling layers."""
  in_dim: int
  h_dims: Sequence[int]
  patch_size: Sequence[int]
  swin_heads: Sequence[int]
  swin_depth: int
  window_size: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feat):
    """feat: (B, F, T, 2) -> list of (B, H_i, W, h_dims[i]) for every scale."""
    h = self.h_dims
    x = PatchEmbed(self.in_dim, h[0], tuple(self.patch_size), dtype=self.dtype, name="patch_embed")(feat)
    x = TransformerLayer(h[0], h[0], self.swin_heads[0], self.swin_depth, self.window_size,
                         self.mlp_ratio, None, self.dtype, name="pre_nn")(x)
    enc_hs = [x]
    for i in range(len(h) - 1):
      x = TransformerLayer(h[i], h[i + 1], self.swin_heads[i], self.swin_depth, self.window_size,
                           self.mlp_ratio, "down", self.dtype, name=f"blocks_{i}")(x)
      enc_hs.append(x)
    return enc_hs


class Decoder(nn.Module):
  """Upscaling layers (reversed h_dims), post_nn and PatchDeEmbed."""
  in_dim: int
  h_dims: Sequence[int]  # decoder order: bottom (largest) first
  patch_size: Sequence[int]
  swin_heads: Sequence[int]  # decoder order
  swin_depth: int
  window_size: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  def setup(self):
    h = self.h_dims
    self.blocks = [TransformerLayer(h[i], h[i + 1], self.swin_heads[i], self.swin_depth, self.window_size,
                                    self.mlp_ratio, "up", self.dtype) for i in range(len(h) - 1)]
    self.post_nn = TransformerLayer(h[-1], h[-1], self.swin_heads[-1], self.swin_depth, self.window_size,
                                    self.mlp_ratio, None, self.dtype)
    self.patch_deembed = PatchDeEmbed(self.in_dim, h[-1], tuple(self.patch_size), self.dtype)

  def up(self, i: int, x):
    """Up layer i: (B, H, W, C_i) -> (B, 2H, W, C_{i+1})."""
    return self.blocks[i](x)

  def head(self, x):
    """post_nn + de-embedding: (B, H, W, C) -> (B, F, T, 2)."""
    return self.patch_deembed(self.post_nn(x))

  def __call__(self, x):
    for i in range(len(self.blocks)):
      x = self.up(i, x)
    return self.head(x)


class ESC(nn.Module):
  """Efficient Speech Codec (`csvq+swinT`); field names follow the original constructor."""
  in_dim: int = 2
  in_freq: int = 192
  h_dims: Sequence[int] = (45, 72, 96, 144, 192, 384)
  max_streams: int = 6
  win_len: int = 20
  hop_len: int = 5
  sr: int = 16000
  patch_size: Sequence[int] = (3, 2)
  swin_heads: Sequence[int] = (3, 6, 12, 24, 24)
  swin_depth: int = 2
  window_size: int = 4
  mlp_ratio: float = 4.0
  overlap: int = 2
  group_size: int = 3
  codebook_size: int = 1024
  codebook_dims: Sequence[int] = (8, 8, 8, 8, 8, 8)
  l2norm: bool = True
  backbone: str = "transformer"
  dtype: Any = jnp.float32  # compute dtype of matmuls (bf16 opt-in); params stay float32

  def setup(self):
    if self.backbone != "transformer":
      raise ValueError(f"ESC backbone {self.backbone!r} is not supported (only 'transformer')")
    if len(self.h_dims) != self.max_streams:
      raise ValueError(f"h_dims has {len(self.h_dims)} scales but max_streams={self.max_streams}")
    dec_h = tuple(self.h_dims)[::-1]
    self.encoder = Encoder(self.in_dim, tuple(self.h_dims), tuple(self.patch_size), tuple(self.swin_heads),
                           self.swin_depth, self.window_size, self.mlp_ratio, self.dtype)
    self.decoder = Decoder(self.in_dim, dec_h, tuple(self.patch_size), tuple(self.swin_heads)[::-1],
                           self.swin_depth, self.window_size, self.mlp_ratio, self.dtype)
    h0 = self.in_freq // self.patch_size[0]  # frequency patches at the top scale
    self.quantizers = [  # streams 0 and 1 both sit at the bottom scale
        ProductVQ(dec_h[max(i - 1, 0)], h0 // 2 ** (self.max_streams - max(i, 1)), self.overlap,
                  self.group_size, self.codebook_dims[i], self.codebook_size, self.l2norm)
        for i in range(self.max_streams)]

  # ---- signal <-> features ----
  @property
  def n_fft(self) -> int:
    return 2 * (self.in_freq - 1)

  @property
  def hop(self) -> int:
    return int(self.hop_len * self.sr * 1e-3)

  @property
  def win(self) -> int:
    return int(self.win_len * self.sr * 1e-3)

  def spec(self, x):
    """(B, L) audio -> (B, 2, F, T) real/imag STFT features."""
    return audio.stft(x, self.n_fft, self.win, self.hop)

  def wave(self, feat):
    """(B, 2, F, T) -> (B, hop*(T-1)) audio."""
    return audio.istft(feat, self.n_fft, self.win, self.hop)

  def _encode_feats(self, x):
    feat = self.spec(x)
    return feat, self.encoder(feat.transpose(0, 2, 3, 1).astype(self.dtype))

  def _to_feat(self, y):
    return y.transpose(0, 3, 1, 2).astype(jnp.float32)

  # ---- training / evaluation forward ----
  def __call__(self, x, num_streams=6, train: bool = False, freeze_codebook=False):
    """Forward pass of the original `ESC.forward`.

    Args:
      x: (B, L) audio; L must give an even number of time patches divisible by overlap.
      num_streams: streams transmitted, 1..max_streams. A traced int in training
        mode (non-transmitted streams are masked); a Python int in eval mode.
      train: training mode (straight-through estimator, masked streams).
      freeze_codebook: traced bool (train only); pre-training bypass of all codebooks,
        num_streams forced to max_streams.
    Returns: dict raw_feat, recon_feat (B, 2, F, T), recon_audio (B, L'),
      codes (B, max_streams or num_streams, group_size, W/overlap),
      cm_loss, cb_loss (B,), and `enc_hs`/`dec_hs` token maps for inspection.
    """
    feat, enc_hs = self._encode_feats(x)
    if train:
      num_streams = jnp.where(freeze_codebook, self.max_streams, num_streams)
    elif isinstance(num_streams, int) and not 1 <= num_streams <= self.max_streams:
      raise ValueError(f"num_streams must be in 1..{self.max_streams}, got {num_streams}")
    out = self.quantizers[0](enc_hs[-1], train, freeze_codebook)
    dec_hs, codes = [out["z_q"]], [out["codes"]]
    cm, cb = out["cm_loss"], out["cb_loss"]
    for i in range(self.max_streams - 1):
      dec, enc = dec_hs[i], enc_hs[-1 - i]
      if train:
        o = self.quantizers[i + 1](enc - dec, True, freeze_codebook)
        on = (i + 1 < num_streams).astype(jnp.float32)
        dec = dec + o["z_q"] * on
        cm, cb = cm + o["cm_loss"] * on, cb + o["cb_loss"] * on
        codes.append(o["codes"])
      elif i + 1 < num_streams:
        o = self.quantizers[i + 1](enc - dec, False)
        dec = dec + o["z_q"]
        cm, cb = cm + o["cm_loss"], cb + o["cb_loss"]
        codes.append(o["codes"])
      dec_hs.append(self.decoder.up(i, dec.astype(self.dtype)))
    recon_feat = self._to_feat(self.decoder.head(dec_hs[-1]))
    return dict(raw_feat=feat, recon_feat=recon_feat, recon_audio=self.wave(recon_feat),
                codes=jnp.stack(codes, 1), cm_loss=cm, cb_loss=cb,
                enc_hs=[_tokens(h) for h in enc_hs], dec_hs=[_tokens(h) for h in dec_hs])

  # ---- codec API ----
  def encode(self, x, num_streams: int = 6):
    """(B, L) audio -> int32 codes (B, num_streams, group_size, W/overlap)."""
    if not 1 <= num_streams <= self.max_streams:
      raise ValueError(f"num_streams must be in 1..{self.max_streams}, got {num_streams}")
    _, enc_hs = self._encode_feats(x)
    codes = [self.quantizers[0].encode(enc_hs[-1])]
    dec = self.quantizers[0].decode(codes[0])
    for i in range(num_streams - 1):
      code = self.quantizers[i + 1].encode(enc_hs[-1 - i] - dec)
      codes.append(code)
      if len(codes) == num_streams:
        break
      dec = self.decoder.up(i, (dec + self.quantizers[i + 1].decode(code)).astype(self.dtype))
    return jnp.stack(codes, 1)

  def reconstruct(self, x, num_streams):
    """encode(x, s) then decode with a traced s: one program serves every bitrate.

    Returns (codes (B, max_streams, group_size, W/overlap), audio (B, L')); codes[:, :s]
    and the audio equal `encode` + `decode`: streams >= s are computed but leave
    the decoder state unchanged (`where`, not a multiply).
    """
    _, enc_hs = self._encode_feats(x)
    q = self.quantizers
    codes = [q[0].encode(enc_hs[-1])]
    dec = q[0].decode(codes[0])
    for i in range(self.max_streams - 1):
      code = q[i + 1].encode(enc_hs[-1 - i] - dec)
      codes.append(code)
      dec = jnp.where(i + 1 < num_streams, dec + q[i + 1].decode(code), dec)
      dec = self.decoder.up(i, dec.astype(self.dtype))
    return jnp.stack(codes, 1), self.wave(self._to_feat(self.decoder.head(dec)))

  def decode_features(self, codes):
    """codes (B, s, group_size, T') -> (decoder token maps, recon_feat (B, 2, F, 4T'))."""
    s = codes.shape[1]
    if not 1 <= s <= self.max_streams:
      raise ValueError(f"codes carry {s} streams; expected 1..{self.max_streams}")
    dec_hs = [self.quantizers[0].decode(codes[:, 0])]
    for i in range(self.max_streams - 1):
      dec = dec_hs[i]
      if i + 1 < s:
        dec = dec + self.quantizers[i + 1].decode(codes[:, i + 1])
      dec_hs.append(self.decoder.up(i, dec.astype(self.dtype)))
    return [_tokens(h) for h in dec_hs], self._to_feat(self.decoder.head(dec_hs[-1]))

  def decode(self, codes):
    """codes (B, s, group_size, T') -> (B, 80*(4T'-1)) audio."""
    return self.wave(self.decode_features(codes)[1])


MODEL_NAMES = ("csvq+swinT",)


def make_model(model_config, model_name: str = "csvq+swinT", dtype=jnp.float32) -> ESC:
  """Build ESC from the original constructor keywords (`config.model` or a release's `model:`)."""
  if model_name not in MODEL_NAMES:
    raise ValueError(f"model_name {model_name!r} is not supported; expected one of {MODEL_NAMES}")
  kw = dict(model_config)
  fields = set(ESC.__dataclass_fields__) - {"parent", "name", "dtype"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown ESC model keyword(s) {unknown}; valid: {sorted(fields)}")
  for k in ("h_dims", "patch_size", "swin_heads", "codebook_dims"):
    if k in kw:
      kw[k] = tuple(kw[k])
  return ESC(**kw, dtype=dtype)


def num_params(params) -> int:
  import jax
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
