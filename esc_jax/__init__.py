"""esc-jax: the Efficient Speech Codec (Gu & Diao, EMNLP 2024) in JAX/Flax.

  codec = esc_jax.load("converted_or_trained_dir")
  codes = codec.encode(audio_16k, num_streams=6)   # (B, s, 3, T') int32
  audio = codec.decode(codes, length=len(audio_16k))
"""
from esc_jax.api import Codec, load
from esc_jax.checkpoint import CheckpointError, save_codec
from esc_jax.codec import ESC, RVQCodec, make_model

__all__ = ["Codec", "CheckpointError", "ESC", "RVQCodec", "load", "make_model", "save_codec"]
__version__ = "0.2.0"
