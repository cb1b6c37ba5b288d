"""ESC and its ablation variants: encoders, decoders, encode/decode.

Four codecs, as the original's `make_model` names them:
  csvq+swinT  ESC: Swin encoder, cross-scale residual VQ decoder (`ESC`)
  csvq+conv   the same with the convolution backbone (`ESC(backbone="convolution")`)
  rvq+swinT   Swin encoder/decoder, product residual VQ at the bottleneck only (`RVQCodec`)
  rvq+conv    the same with the convolution backbone

Parameter tree (mirrors the PyTorch module names; list index i -> `name_i`):
  encoder/{patch_embed, pre_nn, blocks_i}
  decoder/{blocks_i, post_nn, patch_deembed}
  ESC:      quantizers_i/{vqs_m/embedding, down_projs_m, up_projs_m}
  RVQCodec: quantizers/vqs_m/{proj_down, proj_up, vqs_k/embedding}
The convolution backbone adds BatchNorm running statistics in the
"batch_stats" collection (same paths); apply a training forward with
`mutable=["batch_stats"]`.

Frame geometry (defined once in `CodecBase`, used by the codec API, training,
evaluation and the bitstream): one code frame covers `samples_per_frame` =
hop * patch_w * overlap samples (320 = 20 ms at the defaults); the model maps
a length L to itself iff L = k * samples_per_frame - hop (`valid_length`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esc_jax import audio
from esc_jax.layers.attention import TransformerLayer
from esc_jax.layers.conv import Convolution2D, ConvolutionLayer
from esc_jax.layers.scale import PatchDeEmbed, PatchEmbed
from esc_jax.quantize import ProductResidualVQ, ProductVQ

BACKBONES = ("transformer", "convolution")


def check_num_streams(s, max_streams: int, traced_ok: bool = False):
  """A stream count as an int in 1..max_streams; ValueError otherwise (bool included).

  With `traced_ok`, a JAX array (the traced count of a program that serves every
  bitrate) is returned as is, unchecked.
  """
  if traced_ok and isinstance(s, jax.Array):
    return s
  if isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 1 <= s <= max_streams:
    return int(s)
  shown = int(s) if isinstance(s, np.integer) else s
  raise ValueError(f"num_streams must be an integer in 1..{max_streams}, got {shown!r}")


def _tokens(x):
  """(B, H, W, C) -> (B, H*W, C), the original's row-major token layout."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


class _Backbone(nn.Module):
  """The fields of `Encoder` and `Decoder` (the Decoder's h_dims and swin_heads in its own
  order: bottom scale first)."""
  in_dim: int
  h_dims: Sequence[int]
  patch_size: Sequence[int]
  swin_heads: Sequence[int]
  swin_depth: int
  window_size: int
  mlp_ratio: float
  dtype: Any = jnp.float32
  backbone: str = "transformer"
  kernel_size: Sequence[int] = (5, 2)  # convolution backbone
  conv_depth: int = 1  # residual units per convolution layer


class Encoder(_Backbone):
  """PatchEmbed -> pre_nn -> len(h_dims)-1 downscaling layers (Swin or convolution)."""

  @nn.compact
  def __call__(self, feat, train: bool = False):
    """feat: (B, F, T, 2) -> list of (B, H_i, W, h_dims[i]) for every scale.

    train: BatchNorm mode of the convolution backbone (unused by the transformer).
    """
    h = self.h_dims
    conv = self.backbone == "convolution"
    x = PatchEmbed(self.in_dim, h[0], tuple(self.patch_size), norm=not conv, dtype=self.dtype,
                   name="patch_embed")(feat)
    if conv:
      x = Convolution2D(h[0], h[0], tuple(self.kernel_size), False, dtype=self.dtype, name="pre_nn")(x)
    else:
      x = TransformerLayer(h[0], h[0], self.swin_heads[0], self.swin_depth, self.window_size,
                           self.mlp_ratio, None, self.dtype, name="pre_nn")(x)
    enc_hs = [x]
    for i in range(len(h) - 1):
      if conv:
        x = ConvolutionLayer(h[i], h[i + 1], self.conv_depth, tuple(self.kernel_size), False, self.dtype,
                             name=f"blocks_{i}")(x, train)
      else:
        x = TransformerLayer(h[i], h[i + 1], self.swin_heads[i], self.swin_depth, self.window_size,
                             self.mlp_ratio, "down", self.dtype, name=f"blocks_{i}")(x)
      enc_hs.append(x)
    return enc_hs


class Decoder(_Backbone):
  """Upscaling layers (h_dims in decoder order, bottom scale first), post_nn and
  PatchDeEmbed (Swin or convolution)."""

  def setup(self):
    h = self.h_dims
    if self.backbone == "convolution":
      self.blocks = [ConvolutionLayer(h[i], h[i + 1], self.conv_depth, tuple(self.kernel_size), True, self.dtype)
                     for i in range(len(h) - 1)]
      self.post_nn = Convolution2D(h[-1], h[-1], tuple(self.kernel_size), False, dtype=self.dtype)
    else:
      self.blocks = [TransformerLayer(h[i], h[i + 1], self.swin_heads[i], self.swin_depth, self.window_size,
                                      self.mlp_ratio, "up", self.dtype) for i in range(len(h) - 1)]
      self.post_nn = TransformerLayer(h[-1], h[-1], self.swin_heads[-1], self.swin_depth, self.window_size,
                                      self.mlp_ratio, None, self.dtype)
    self.patch_deembed = PatchDeEmbed(self.in_dim, h[-1], tuple(self.patch_size), self.dtype)

  def up(self, i: int, x, train: bool = False):
    """Up layer i: (B, H, W, C_i) -> (B, 2H, W, C_{i+1}); train: BatchNorm mode (convolution)."""
    return self.blocks[i](x, train) if self.backbone == "convolution" else self.blocks[i](x)

  def head(self, x):
    """post_nn + de-embedding: (B, H, W, C) -> (B, F, T, 2)."""
    return self.patch_deembed(self.post_nn(x))

  def __call__(self, x, train: bool = False):
    for i in range(len(self.blocks)):
      x = self.up(i, x, train)
    return self.head(x)


class CodecBase(nn.Module):
  """What every codec variant shares: the original's common constructor keywords,
  frame geometry, bitrate, STFT front end and the encoder/decoder wiring.
  Subclasses add their quantiser's keywords and `setup` (`encoder`, `decoder`)."""
  in_dim: int = 2
  in_freq: int = 192
  h_dims: Sequence[int] = (45, 72, 96, 144, 192, 384)
  max_streams: int = 6
  win_len: int = 20
  hop_len: int = 5
  sr: int = 16000
  patch_size: Sequence[int] = (3, 2)
  backbone: str = "transformer"  # or "convolution"
  swin_heads: Sequence[int] = (3, 6, 12, 24, 24)  # transformer backbone
  swin_depth: int = 2
  window_size: int = 4
  mlp_ratio: float = 4.0
  kernel_size: Sequence[int] = (5, 2)  # convolution backbone
  conv_depth: int = 1  # convolution backbone: residual units per layer
  overlap: int = 2
  group_size: int = 3  # product groups: codes per stream per frame
  codebook_size: int = 1024
  l2norm: bool = True
  dtype: Any = jnp.float32  # compute dtype of matmuls (bf16 opt-in); params stay float32

  # ---- frame geometry and bitrate (plain Python; usable on an unbound module) ----
  @property
  def n_fft(self) -> int:
    return 2 * (self.in_freq - 1)

  @property
  def hop(self) -> int:
    return int(self.hop_len * self.sr * 1e-3)

  @property
  def win(self) -> int:
    return int(self.win_len * self.sr * 1e-3)

  @property
  def samples_per_frame(self) -> int:
    """Audio samples per code frame: hop * time patch * overlap (320 = 20 ms for ESC)."""
    return self.hop * self.patch_size[1] * self.overlap

  def valid_length(self, n: int) -> int:
    """Smallest length >= n that the model maps to itself (k * samples_per_frame - hop)."""
    spf = self.samples_per_frame
    return max(1, -(-(n + self.hop) // spf)) * spf - self.hop

  def largest_valid_length(self, n: int) -> int:
    """Largest length <= n that the model maps to itself (0 if none)."""
    spf = self.samples_per_frame
    return max(0, (n + self.hop) // spf * spf - self.hop)

  def num_frames(self, n: int) -> int:
    """Code frames T' for an input of n samples (zero-padded to `valid_length`)."""
    return (self.valid_length(n) + self.hop) // self.samples_per_frame

  def frames_to_samples(self, frames: int) -> int:
    """Samples decoded from `frames` code frames (the valid length of that many frames)."""
    return frames * self.samples_per_frame - self.hop

  @property
  def kbps_per_stream(self) -> float:
    """Bitrate of one stream: group_size codes of log2(codebook_size) bits per frame (1.5 for ESC)."""
    return math.log2(self.codebook_size) * self.group_size * self.sr / self.samples_per_frame / 1000

  def kbps(self, num_streams):
    """Bitrate of `num_streams` streams (Python or traced)."""
    return num_streams * self.kbps_per_stream

  @property
  def reach_frames(self) -> float:
    """How far (in code frames, each side) the codes and audio of a frame depend on the signal.

    A Swin block widens a token's reach by window/2 time patches (window and
    shifted window alternate); a convolution of the backbone by kernel width - 1.
    Counted over the layers on the longest coding path (`_path_layers`); the
    STFT, patch (de-)embedding and frame grouping add a few frames more, which
    `esc_jax.streaming.context_frames_for` covers.
    """
    if self.backbone == "convolution":  # residual units: 2 convs of width 2; then the scaling conv
      per_layer = 2 * self.conv_depth + (self.kernel_size[1] - 1)
    else:
      per_layer = self.swin_depth * (self.window_size // 2)
    return per_layer * self._path_layers() / self.overlap

  def _path_layers(self) -> int:
    """Layers on the longest path between a frame's audio and its codes or reconstruction."""
    return len(self.h_dims)  # the encoder (pre_nn + downscaling layers); decoding has as many

  def _check_config(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
    if len(self.h_dims) != self.max_streams:
      raise ValueError(f"h_dims has {len(self.h_dims)} scales but max_streams={self.max_streams}")
    if self.backbone == "transformer" and len(self.swin_heads) != len(self.h_dims) - 1:
      raise ValueError(f"swin_heads has {len(self.swin_heads)} entries; expected len(h_dims) - 1 = "
                       f"{len(self.h_dims) - 1}")

  def _check_streams(self, s):
    """A concrete stream count as an int in 1..max_streams; a traced one as is."""
    return check_num_streams(s, self.max_streams, traced_ok=True)

  def _check_codes(self, codes, num_streams=None):
    """The streams to decode from codes (B, s, group_size, T'): s (ValueError outside
    1..max_streams), or `num_streams` (a Python or traced int) where s = max_streams."""
    s = codes.shape[1]
    if not 1 <= s <= self.max_streams:
      raise ValueError(f"codes carry {s} streams; expected 1..{self.max_streams}")
    if num_streams is None:
      return s
    if s != self.max_streams:
      raise ValueError(f"decode with num_streams needs codes of all {self.max_streams} streams, got {s} "
                       f"(decode codes[:, :n] without num_streams)")
    return self._check_streams(num_streams)

  # ---- decoding (each variant defines `_decode`: codes, streams -> (decoder maps, features, audio)) ----
  def decode_features(self, codes):
    """codes (B, s, group_size, T') -> (decoder token maps, recon_feat (B, 2, F, 4T'))."""
    dec_hs, feat, _ = self._decode(codes)
    return [_tokens(h) for h in dec_hs], feat

  def decode(self, codes, num_streams=None):
    """codes (B, s, group_size, T') -> (B, frames_to_samples(T')) audio.

    num_streams: None decodes all s streams; an int (Python or traced) decodes the
    first num_streams of codes that carry all max_streams streams, so one program
    serves every bitrate, bit-identical to `decode(codes[:, :num_streams])`.
    """
    return self._decode(codes, num_streams)[2]

  def _backbone(self):
    """(encoder, decoder) of this configuration."""
    dec_h = tuple(self.h_dims)[::-1]
    common = dict(patch_size=tuple(self.patch_size), swin_depth=self.swin_depth,
                  window_size=self.window_size, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                  backbone=self.backbone, kernel_size=tuple(self.kernel_size), conv_depth=self.conv_depth)
    return (Encoder(self.in_dim, tuple(self.h_dims), swin_heads=tuple(self.swin_heads), **common),
            Decoder(self.in_dim, dec_h, swin_heads=tuple(self.swin_heads)[::-1], **common))

  # ---- signal <-> features ----
  def spec(self, x):
    """(B, L) audio -> (B, 2, F, T) real/imag STFT features."""
    return audio.stft(x, self.n_fft, self.win, self.hop)

  def wave(self, feat):
    """(B, 2, F, T) -> (B, hop*(T-1)) audio."""
    return audio.istft(feat, self.n_fft, self.win, self.hop)

  def _analyse(self, x, train: bool = False):
    """(B, L) audio -> (features (B, 2, F, T), encoder maps at every scale)."""
    feat = self.spec(x)
    return feat, self.encoder(feat.transpose(0, 2, 3, 1).astype(self.dtype), train)

  def _synthesise(self, dec):
    """Top decoder map (B, H, W, C) -> (features (B, 2, F, T) float32, audio (B, L))."""
    feat = self.decoder.head(dec).transpose(0, 3, 1, 2).astype(jnp.float32)
    return feat, self.wave(feat)


# A stream's quantizer step in the cross-scale loop: (stream index, residual to
# code or None when decoding from codes) -> dict with at least "z_q" (B, H, W, C).
StreamFn = Callable[[int, Any], dict]


class ESC(CodecBase):
  """Efficient Speech Codec (`csvq+swinT`, or `csvq+conv` with backbone="convolution");
  field names follow the original constructor."""
  codebook_dims: Sequence[int] = (8, 8, 8, 8, 8, 8)  # one per stream

  def _path_layers(self) -> int:
    """`encode` runs the encoder and the first max_streams - 2 up layers (residuals of later streams)."""
    return len(self.h_dims) + max(self.max_streams - 2, 0)

  def _check_config(self):
    super()._check_config()
    if len(self.codebook_dims) != self.max_streams:
      raise ValueError(f"codebook_dims has {len(self.codebook_dims)} entries but max_streams={self.max_streams}")

  def setup(self):
    self._check_config()
    dec_h = tuple(self.h_dims)[::-1]
    self.encoder, self.decoder = self._backbone()
    h0 = self.in_freq // self.patch_size[0]  # frequency patches at the top scale
    self.quantizers = [  # streams 0 and 1 both sit at the bottom scale
        ProductVQ(dec_h[max(i - 1, 0)], h0 // 2 ** (self.max_streams - max(i, 1)), self.overlap,
                  self.group_size, self.codebook_dims[i], self.codebook_size, self.l2norm)
        for i in range(self.max_streams)]

  # ---- the cross-scale residual loop (SPEC "Encoder / cross-scale decoder") ----
  def cross_scale(self, stream: StreamFn, num_streams, enc_hs=None, full: bool = True, train: bool = False):
    """Runs the cross-scale residual decoder once; every mode is a choice of `stream`.

    dec_0 = Q_0(enc_hs[-1]); for i = 0..max_streams-2:
    dec_{i+1} = up_i(dec_i + Q_{i+1}(enc_hs[-1-i] - dec_i)) if stream i+1 is
    transmitted, else up_i(dec_i).

    Args:
      stream: stream(i, residual) -> dict(z_q, ...); residual is None when
        `enc_hs` is None (decoding from codes).
      num_streams: a Python int (streams >= it are not run) or a traced int
        (all streams run; the untransmitted ones leave the decoder state
        unchanged through `jnp.where`, so values equal the Python-int path).
      enc_hs: encoder maps of every scale, or None.
      full: run every up layer; False stops after the last transmitted stream
        (encoding needs no further decoder state).
      train: BatchNorm mode of the up layers (convolution backbone).
    Returns:
      (dec_hs, outs): decoder maps after every up layer (dec_hs[0] = dec_0),
      and the stream outputs with an "on" entry (bool, traced or Python).
    """
    static = isinstance(num_streams, int)
    res = lambda i, dec: None if enc_hs is None else enc_hs[-1 - i] - dec
    out = stream(0, None if enc_hs is None else enc_hs[-1])
    dec, outs = out["z_q"], [dict(out, on=True)]
    dec_hs = [dec]
    for i in range(self.max_streams - 1):
      if not static or i + 1 < num_streams:
        o = stream(i + 1, res(i, dec))
        on = i + 1 < num_streams
        dec = dec + o["z_q"] if static else jnp.where(on, dec + o["z_q"], dec)
        outs.append(dict(o, on=on))
      if not full and static and i + 2 >= num_streams:
        break
      dec = self.decoder.up(i, dec.astype(self.dtype), train)
      dec_hs.append(dec)
    return dec_hs, outs

  def _code_stream(self, i, r):
    """Encode-mode stream: nearest codes of the residual and their decoded vectors."""
    code = self.quantizers[i].encode(r)
    return dict(z_q=self.quantizers[i].decode(code), codes=code)

  # ---- training / evaluation forward ----
  def __call__(self, x, num_streams=6, train: bool = False, freeze_codebook=False):
    """Forward pass of the original `ESC.forward`.

    Args:
      x: (B, L) audio; L must give an even number of time patches divisible by overlap.
      num_streams: streams transmitted, 1..max_streams. A Python int in eval mode
        skips the other streams; a traced int (training, or eval with one program
        for every bitrate) runs all and masks the non-transmitted ones.
      train: training mode (straight-through estimator, masked streams, BatchNorm
        batch statistics: apply with mutable=["batch_stats"] for the convolution backbone).
      freeze_codebook: traced bool (train only); pre-training bypass of all codebooks,
        num_streams forced to max_streams.
    Returns: dict raw_feat, recon_feat (B, 2, F, T), recon_audio (B, L'),
      codes (B, max_streams or num_streams, group_size, W/overlap),
      cm_loss, cb_loss (B,), and `enc_hs`/`dec_hs` token maps for inspection.
    """
    feat, enc_hs = self._analyse(x, train)
    if train:
      num_streams = jnp.where(freeze_codebook, self.max_streams, num_streams)
      stream = lambda i, r: self.quantizers[i](r, True, freeze_codebook)
    else:
      num_streams = self._check_streams(num_streams)
      stream = lambda i, r: self.quantizers[i](r, False)
    dec_hs, outs = self.cross_scale(stream, num_streams, enc_hs, train=train)
    cm = sum(jnp.where(o["on"], o["cm_loss"], 0.0) for o in outs)
    cb = sum(jnp.where(o["on"], o["cb_loss"], 0.0) for o in outs)
    recon_feat, recon_audio = self._synthesise(dec_hs[-1])
    return dict(raw_feat=feat, recon_feat=recon_feat, recon_audio=recon_audio,
                codes=jnp.stack([o["codes"] for o in outs], 1), cm_loss=cm, cb_loss=cb,
                enc_hs=[_tokens(h) for h in enc_hs], dec_hs=[_tokens(h) for h in dec_hs])

  # ---- codec ----
  def encode(self, x, num_streams: int = 6):
    """(B, L) audio -> int32 codes (B, num_streams, group_size, W/overlap)."""
    num_streams = self._check_streams(num_streams)
    _, outs = self.cross_scale(self._code_stream, num_streams, self._analyse(x)[1], full=False)
    return jnp.stack([o["codes"] for o in outs], 1)

  def _decode(self, codes, num_streams=None):
    """codes (B, s, group_size, T') -> (decoder maps, recon_feat (B, 2, F, 4T'), audio)."""
    s = self._check_codes(codes, num_streams)
    dec_hs, _ = self.cross_scale(lambda i, _: dict(z_q=self.quantizers[i].decode(codes[:, i])), s)
    return (dec_hs, *self._synthesise(dec_hs[-1]))

  def round_trip(self, x, num_streams):
    """`encode(x, s)` then `decode` with s traced: one program serves every bitrate.

    Returns (codes (B, max_streams, group_size, W/overlap), audio (B, L')); codes[:, :s]
    and the audio are bit-identical to `encode` + `decode`. (A Python int s gives
    only the s transmitted streams' codes.)
    """
    _, enc_hs = self._analyse(x)
    dec_hs, outs = self.cross_scale(self._code_stream, num_streams, enc_hs)
    return jnp.stack([o["codes"] for o in outs], 1), self._synthesise(dec_hs[-1])[1]


class RVQCodec(CodecBase):
  """The original's `RVQCodecs` (`rvq+swinT`, `rvq+conv`): the same encoder and
  decoder as ESC, quantised only at the bottleneck by a product residual VQ
  (`group_size` product groups, `num_rvqs` residual codebooks each = the streams).

  Field names follow the original constructor; `max_streams` (the number of
  scales, as in ESC) must equal `num_rvqs` so that every API that counts
  streams with `max_streams` (training's bitrate sampling, the codec) is right.
  """
  num_rvqs: int = 6  # residual depth: the number of streams
  codebook_dim: int = 8  # one dimension for every codebook

  def _check_config(self):
    super()._check_config()
    if self.num_rvqs != self.max_streams:
      raise ValueError(f"num_rvqs={self.num_rvqs} must equal max_streams={self.max_streams} "
                       "(the residual depth is the number of streams)")

  def setup(self):
    self._check_config()
    self.encoder, self.decoder = self._backbone()
    h0 = self.in_freq // self.patch_size[0]
    self.quantizers = ProductResidualVQ(self.h_dims[-1], h0 // 2 ** (self.max_streams - 1), self.overlap,
                                        self.group_size, self.num_rvqs, self.codebook_dim,
                                        self.codebook_size, self.l2norm)

  def _decode_map(self, z_q, train: bool = False):
    """Bottleneck map -> (decoder maps after every up layer, recon_feat, audio)."""
    dec_hs = [z_q]
    for i in range(len(self.h_dims) - 1):
      dec_hs.append(self.decoder.up(i, dec_hs[-1].astype(self.dtype), train))
    return (dec_hs, *self._synthesise(dec_hs[-1]))

  def __call__(self, x, num_streams=6, train: bool = False, freeze_codebook=False):
    """Forward pass of the original `RVQCodecs.forward`; arguments and outputs as `ESC.__call__`.

    Training codes are (B, num_rvqs, group_size, W/overlap) (streams >= num_streams
    masked); eval codes (B, num_streams, group_size, W/overlap), or all num_rvqs
    streams' codes when num_streams is traced (as ESC's eval forward).
    """
    feat, enc_hs = self._analyse(x, train)
    if train:
      q = self.quantizers(enc_hs[-1], num_streams, True, freeze_codebook)
    else:
      num_streams = self._check_streams(num_streams)
      q = self.quantizers(enc_hs[-1], num_streams, False)
    dec_hs, recon_feat, recon_audio = self._decode_map(q["z_q"], train)
    return dict(raw_feat=feat, recon_feat=recon_feat, recon_audio=recon_audio, codes=q["codes"],
                cm_loss=q["cm_loss"], cb_loss=q["cb_loss"],
                enc_hs=[_tokens(h) for h in enc_hs], dec_hs=[_tokens(h) for h in dec_hs])

  def encode(self, x, num_streams: int = 6):
    """(B, L) audio -> int32 codes (B, num_streams, group_size, W/overlap)."""
    num_streams = self._check_streams(num_streams)
    return self.quantizers.encode(self._analyse(x)[1][-1], num_streams)

  def _decode(self, codes, num_streams=None):
    """codes (B, s, group_size, T') -> (decoder maps, recon_feat (B, 2, F, 4T'), audio)."""
    self._check_codes(codes, num_streams)
    return self._decode_map(self.quantizers.decode(codes, num_streams))

  def round_trip(self, x, num_streams):
    """`encode(x, s)` then `decode` with s traced: one program serves every bitrate.

    Returns (codes (B, max_streams, group_size, W/overlap), audio (B, L')); codes[:, :s]
    and the audio are bit-identical to `encode` + `decode`.
    """
    codes = self.quantizers.encode(self._analyse(x)[1][-1], self.max_streams)
    return codes, self._decode(codes, num_streams)[2]


MODEL_NAMES = ("csvq+swinT", "csvq+conv", "rvq+swinT", "rvq+conv")
_CLASSES = {"csvq": ESC, "rvq": RVQCodec}
_BACKBONE_OF = {"swinT": "transformer", "conv": "convolution"}
_SEQUENCES = ("h_dims", "patch_size", "swin_heads", "codebook_dims", "kernel_size")


def make_model(model_config, model_name: str = "csvq+swinT", dtype=jnp.float32) -> ESC | RVQCodec:
  """Build a codec from the original constructor keywords (`config.model` or a release's `model:`).

  model_name: one of MODEL_NAMES (the original's `make_model` names). Its backbone
  part fixes `backbone`: a missing keyword takes it, a contradicting one is an error.
  """
  if model_name not in MODEL_NAMES:
    raise ValueError(f"model_name {model_name!r} is not supported; expected one of {MODEL_NAMES}")
  quant, arch = model_name.split("+")
  cls, backbone = _CLASSES[quant], _BACKBONE_OF[arch]
  kw = dict(model_config)
  fields = set(cls.__dataclass_fields__) - {"parent", "name", "dtype"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} model keyword(s) {unknown} for {model_name}; valid: {sorted(fields)}")
  if kw.setdefault("backbone", backbone) != backbone:
    raise ValueError(f"model_name {model_name!r} needs backbone={backbone!r}, got {kw['backbone']!r}")
  if cls is RVQCodec and not isinstance(kw.get("codebook_dim", 8), int):
    raise ValueError(f"{model_name}: codebook_dim must be one integer (shared by every codebook), "
                     f"got {kw['codebook_dim']!r}")
  for k in _SEQUENCES:
    if k in kw:
      kw[k] = tuple(kw[k])
  model = cls(**kw, dtype=dtype)
  model._check_config()  # noqa: SLF001 (setup checks again; this raises before any tracing)
  return model


def num_params(params) -> int:
  import jax
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
