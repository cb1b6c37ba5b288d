"""Training audio for ESC (grain input pipeline; validation audio is read by `esc_jax.evaluation`).

Training stream (deterministic, checkpointable):

  files (sorted, recursive) -> shuffle (reshuffled every epoch) -> repeat forever
    -> random crop of `clip_samples` at 16 kHz (mono mix, soxr resampling,
       zero-padding of short files) -> this process's elements -> batches

Element i of the global stream depends only on (files, seed, i), so batch k of a
run is the same whatever the number of workers or processes: process p of P takes
elements p, p + P, ... and its k-th local batch of B/P clips; together the P local
batches of step k hold exactly elements [k*B, (k+1)*B) of the global stream.
The iterator's `get_state()` / `set_state()` (a small JSON-able dict) resumes it.

Files whose header cannot be read are logged and left out when the folder is
scanned; a file that fails later (corrupt data) is logged once and replaced by the
next readable file, so one bad file never stops a run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Sequence

from absl import logging
import numpy as np

from esc_jax.audio_io import AUDIO_EXTENSIONS, MODEL_RATE as SAMPLE_RATE, find_audio_files, one_line, to_mono


class DataError(ValueError):
  """No usable training or validation audio (one clear line)."""


@dataclasses.dataclass(frozen=True)
class AudioFile:
  path: str
  frames: int  # at the file's own sample rate
  sample_rate: int

  def frames_at(self, sr: int = SAMPLE_RATE) -> int:
    """Length after resampling to `sr`."""
    return int(self.frames * sr // self.sample_rate)


def _probe(path: str) -> AudioFile | str:
  import soundfile as sf
  try:
    info = sf.info(path)
  except Exception as e:  # libsndfile raises several types for corrupt headers
    return f"{type(e).__name__}: {one_line(e)}"
  if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
    return "no samples"
  return AudioFile(path, int(info.frames), int(info.samplerate))


def scan_audio_files(folder, num_threads: int = 16) -> list[AudioFile]:
  """Readable audio files under `folder`; unreadable ones are logged and skipped.

  Raises:
    DataError: missing folder, no audio files, or none of them readable.
  """
  try:
    paths = [str(p) for p in find_audio_files(folder)]
  except FileNotFoundError:
    raise DataError(f"audio folder {str(folder)!r} does not exist or is not a directory") from None
  if not paths:
    raise DataError(f"no audio files ({' '.join(AUDIO_EXTENSIONS)}) under {folder}")
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    probed = list(pool.map(_probe, paths))
  files = []
  for path, p in zip(paths, probed):
    if isinstance(p, AudioFile):
      files.append(p)
    else:
      logging.warning("skipping unreadable audio file %s (%s)", path, p)
  if not files:
    raise DataError(f"none of the {len(paths)} audio files under {folder} is readable")
  if len(files) < len(paths):
    logging.warning("%d of %d audio files under %s are unreadable and skipped",
                    len(paths) - len(files), len(paths), folder)
  return files


# libsndfile reads a 16-bit sample as float32 sample / 32768; reading int16 and
# scaling gives the same floats (exactly: a power of two) about 3x faster.
_INT16_TO_FLOAT = np.float32(1 / 32768)


def read_clip(f: AudioFile, offset: int, n: int, sr: int = SAMPLE_RATE) -> np.ndarray:
  """Samples [offset, offset + n) of `f` resampled to `sr`, mono, zero-padded to n.

  Only the needed part of the file is read (plus a margin for the resampling filter);
  16-bit PCM is read as integers and scaled. Raises ValueError for unreadable data or
  non-finite samples.
  """
  import soundfile as sf
  import soxr

  if f.sample_rate == sr:
    start, count, skip = offset, n, 0
  else:  # a margin of whole resampling periods, so the crop lines up exactly
    g = math.gcd(f.sample_rate, sr)
    period_in, period_out = f.sample_rate // g, sr // g
    k = -(-256 // period_in)  # >= 256 input samples of filter context
    start_exact = offset * f.sample_rate / sr
    first = max(0, int(start_exact // period_in) - k)  # in periods
    start = first * period_in
    skip = offset - first * period_out
    count = int(math.ceil((offset + n) * f.sample_rate / sr)) - start + k * period_in
  try:
    with sf.SoundFile(f.path) as s:
      pcm16 = s.subtype == "PCM_16"
      s.seek(start)
      data = s.read(max(count, 0), dtype="int16" if pcm16 else "float32", always_2d=True)
  except Exception as e:
    raise ValueError(f"cannot read {f.path}: {type(e).__name__}: {e}") from e
  if pcm16:  # the floats libsndfile gives (see _INT16_TO_FLOAT)
    data = np.multiply(data, _INT16_TO_FLOAT, dtype=np.float32)
  elif not np.all(np.isfinite(data)):
    raise ValueError(f"{f.path} contains NaN or infinite samples")
  x = to_mono(data)
  if f.sample_rate != sr and x.size:
    x = soxr.resample(x, f.sample_rate, sr, quality="VHQ")[skip:]
  out = np.zeros(n, np.float32)
  m = min(n, x.size)
  out[:m] = x[:m]
  return out


class RandomCrop:
  """grain random map: file index -> (clip_samples,) float32 random crop at 16 kHz.

  A file that fails to read is logged once (per worker) and the next file in the
  list is used instead, deterministically.
  """

  def __init__(self, files: Sequence[AudioFile], clip_samples: int, sample_rate: int = SAMPLE_RATE):
    self.files = list(files)
    self.clip_samples = int(clip_samples)
    self.sample_rate = int(sample_rate)
    self._bad: set[str] = set()

  def __call__(self, index, rng: np.random.Generator) -> np.ndarray:
    n = len(self.files)
    for k in range(n):
      f = self.files[(int(index) + k) % n]
      if f.path in self._bad:
        continue
      room = f.frames_at(self.sample_rate) - self.clip_samples
      offset = int(rng.integers(0, room + 1)) if room > 0 else 0
      try:
        return read_clip(f, offset, self.clip_samples, self.sample_rate)
      except (ValueError, OSError) as e:
        self._bad.add(f.path)
        logging.warning("skipping unreadable audio file %s (%s)", f.path, e)
    raise DataError(f"none of the {n} training files could be read")


def train_dataset(files: Sequence[AudioFile], clip_samples: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, sample_rate: int = SAMPLE_RATE):
  """Infinite grain MapDataset of this process's (batch_size // process_count, clip) batches."""
  import grain

  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
  ds = (grain.MapDataset.range(len(files)).seed(int(seed) % 2**32).shuffle().repeat(None)
        .random_map(RandomCrop(files, clip_samples, sample_rate)))
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.batch(batch_size // process_count, drop_remainder=True)


def steps_per_epoch(num_files: int, batch_size: int) -> int:
  """Steps that draw every training file once (the original's epoch), at least 1."""
  return max(1, num_files // batch_size)


def train_iterator(files: Sequence[AudioFile], clip_samples: int, batch_size: int, seed: int,
                   num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                   sample_rate: int = SAMPLE_RATE, num_threads: int = 4):
  """Checkpointable iterator of (local_batch, clip_samples) float32 numpy batches.

  Args:
    files: `scan_audio_files(folder)` (any rate and channel count).
    batch_size: global batch (all processes together).
    num_workers: grain worker processes (0: read in this process with threads).
  Returns: a grain DatasetIterator (`next`, `get_state`, `set_state`, `close`).
  """
  import grain

  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  ds = train_dataset(files, clip_samples, batch_size, seed, process_index, process_count, sample_rate)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=4))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags in its workers
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
