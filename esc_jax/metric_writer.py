"""Training metrics: metrics.jsonl, TensorBoard and (optionally) Weights & Biases.

Only process 0 writes. `open_writer` trims rows past the resumed step first
(a killed run may have logged steps after its last checkpoint).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping

from esc_jax.files import json_safe, write_text_atomic

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends {"step", "<prefix>/<name>": value} rows; see `open_writer`."""

  def __init__(self, path: pathlib.Path | None, tb=None, wandb_run=None):
    self.path, self.tb, self.wandb = path, tb, wandb_run

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if self.path is None:
      return
    row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(json_safe(row)) + "\n")  # NaN -> null
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
    if self.wandb is not None:
      self.wandb.log(row, step=int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return 1 << 62


def open_writer(workdir, log_config, start_step: int, active: bool, run_config=None) -> MetricWriter:
  """The writer of a run resumed at `start_step` (inactive on processes other than 0).

  log_config: config.log (tensorboard: bool, wandb: bool, wandb_project: str).
  """
  if not active:
    return MetricWriter(None)
  workdir = pathlib.Path(workdir)
  path = workdir / METRICS_FILE
  if path.exists():
    keep = [l for l in path.read_text().splitlines() if l.strip() and _row_step(l) <= start_step]
    write_text_atomic(path, "".join(l + "\n" for l in keep))
  tb = run = None
  if log_config.tensorboard:
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
  if log_config.wandb:
    import wandb  # optional dependency (pip install esc-jax[wandb]), only when asked for
    id_file = workdir / "wandb_id.txt"
    if not id_file.exists():
      write_text_atomic(id_file, os.urandom(6).hex())
    run = wandb.init(project=log_config.wandb_project or "esc_jax", dir=str(workdir),
                     config=run_config, resume="allow", id=id_file.read_text().strip())
  return MetricWriter(path, tb, run)
