"""Encode + decode time of the ORIGINAL PyTorch ESC at a given stream count (measuring tooling).

Run with the reference kit's interpreter (../shared/tools/reference/, README there):

  /tmp/esc_ref/venv/bin/python bench/reference_streams.py /tmp/esc_ref/src SECONDS STREAMS

It complements the kit's `bench_reference.py infer` (6 streams only): same model
(ESC-Base shapes, random weights), same timing rule (median of 3 after a first
call). Prints one JSON line. Nothing of the original is copied here: it imports it.
"""
import json
import os
import sys
import time

import numpy as np
import torch

KIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools", "reference")
sys.path.insert(0, os.path.join(os.environ.get("ESC_REFERENCE_KIT", KIT), "refshim"))
sys.path.insert(0, sys.argv[1])
from esc.models import ESC  # noqa: E402

BASE = dict(in_dim=2, in_freq=192, h_dims=[45, 72, 96, 144, 192, 384], max_streams=6, win_len=20, hop_len=5,
            sr=16000, patch_size=[3, 2], swin_heads=[3, 6, 12, 24, 24], swin_depth=2, window_size=4,
            mlp_ratio=4.0, overlap=2, group_size=3, codebook_size=1024, codebook_dims=[32, 32, 16, 12, 8, 6],
            l2norm=True)

seconds, streams = float(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = ESC(**BASE).eval()
x = torch.from_numpy((0.1 * np.random.default_rng(1).standard_normal((1, int(seconds * 16000) - 80)))
                     .astype(np.float32))
times = []
with torch.no_grad():
  for _ in range(4):
    t = time.perf_counter()
    codes, fs = model.encode(x, num_streams=streams)
    model.decode(codes, fs)
    times.append(time.perf_counter() - t)
med = float(np.median(times[1:]))
print(json.dumps({"mode": "infer", "audio_s": seconds, "streams": streams, "median_s": med,
                  "threads": torch.get_num_threads()}))
