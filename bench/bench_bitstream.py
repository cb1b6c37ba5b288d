"""Speed of the `.esc` bit packing: 30 minutes of 9 kbps codes, v1 and v2, encode and decode.

  python bench/bench_bitstream.py [--minutes 30]

(The tests check these round trips for exactness; timing lives here, not in tests.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_jax import bitstream as bs  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--minutes", type=float, default=30.0)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  t = int(args.minutes * 60 * 50)  # 20 ms frames
  codes = np.random.default_rng(0).integers(0, 1024, (6, 3, t)).astype(np.int32)
  kw = dict(num_samples=t * 320 - 80, sample_rate=16000, codebook_size=1024, fingerprint=bytes(8))
  print(f"{'format':<8} {'minutes':>8} {'bytes':>10} {'encode s':>9} {'decode s':>9}")
  for version in (1, 2):
    enc, dec = [], []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      data = bs.encode_stream(codes, version=version, **kw)
      t1 = time.perf_counter()
      _, out = bs.decode_stream(data)
      dec.append(time.perf_counter() - t1)
      enc.append(t1 - t0)
    assert np.array_equal(out, codes)
    print(f"v{version:<7} {args.minutes:>8g} {len(data):>10} {min(enc):>9.3f} {min(dec):>9.3f}")


if __name__ == "__main__":
  main()
