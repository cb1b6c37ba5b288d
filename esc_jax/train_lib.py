"""Training ESC (the original's non-adversarial recipe) in one compiled step.

  trainer = Trainer(config, workdir)   # restores WORKDIR/checkpoints if present
  trainer.run()                        # until config.train.num_steps

Recipe (SPEC "Losses and training recipe"): loss `objective.codec_loss`; AdamW
(b1 .9, b2 .999, eps 1e-8, weight decay .01) after global-norm clipping (0.5),
lr 1e-4 constant (or warmup_cosine / exponential); quantisation dropout: with
probability `train.quant_dropout` num_streams ~ U{1..max_streams}, else all,
drawn inside the step from fold_in(PRNGKey(seed), step); steps < pretrain_steps
bypass the codebooks; the optimizer state is re-initialised once, at the first
step after pre-training. num_streams and the phase are traced values, so one
compiled step serves the whole run.

Parallelism: a 1-D mesh "data" over all devices (all processes); the global
batch is sharded along it, params and optimizer state are replicated.
Checkpoints (orbax, WORKDIR/checkpoints/<step>): items "params", "opt_state",
"meta" (step, seed, data-iterator state); WORKDIR/esc_config.json makes WORKDIR
a codec directory for `esc_jax.load`. Retention: the last `ckpt.keep` steps plus
the best by validation PESQ.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esc_jax import checkpoint as ckpt_lib
from esc_jax import data as data_lib
from esc_jax import losses, metrics as metrics_lib
from esc_jax.codec import ESC, make_model
from esc_jax.objective import codec_loss

BEST_METRIC = "pesq"  # validation metric that selects the "best" checkpoint (higher is better)
META_ITEM = "meta"
OPT_ITEM = "opt_state"


class ConfigError(ValueError):
  """A config or workdir that cannot be trained (one clear line)."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; nothing of that step was saved."""


# --------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when a multi-process launch is detected.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port) with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Auto-detected by JAX: SLURM (SLURM_NTASKS > 1) and Open MPI
  (OMPI_COMM_WORLD_SIZE > 1). Call before any other JAX use. Returns whether it ran.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
      kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
      kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], **kw)
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


# --------------------------------------------------------------------------
# Optimizer and the pure train step
# --------------------------------------------------------------------------


def make_schedule(optim, num_steps: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Learning rate as a function of the global step."""
  lr, warm = float(optim.lr), int(optim.get("warmup_steps", 0))
  kind = optim.get("schedule", "constant")
  if kind == "constant":
    sched = optax.constant_schedule(lr)
    if warm > 0:
      sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), sched], [warm])
    return sched
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 0), max(num_steps, warm + 1), end_value=0.0)
  if kind == "exponential":
    return optax.exponential_decay(lr, transition_steps=1, decay_rate=float(optim.decay_rate))
  raise ConfigError(f"optim.schedule {kind!r}: expected constant | warmup_cosine | exponential")


def make_optimizer(optim) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with unit learning rate (the step scales by lr(step)).

  The learning rate follows the global step, so re-initialising the optimizer
  after pre-training resets Adam's moments and bias correction but not the schedule.
  """
  return optax.chain(
      optax.clip_by_global_norm(float(optim.clip_norm)),
      optax.adamw(1.0, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                  weight_decay=float(optim.weight_decay)))


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: steps completed
  params: Any
  opt_state: Any


def kbps_per_stream(model: ESC) -> float:
  frame = model.hop * model.patch_size[1] * model.overlap  # samples per code frame
  return math.log2(model.codebook_size) * model.group_size * model.sr / frame / 1000


def sample_num_streams(key, quant_dropout: float, max_streams: int) -> jnp.ndarray:
  """With probability quant_dropout U{1..max_streams}, else max_streams (int32 scalar)."""
  k_do, k_s = jax.random.split(key)
  drawn = jax.random.randint(k_s, (), 1, max_streams + 1, dtype=jnp.int32)
  return jnp.where(jax.random.bernoulli(k_do, quant_dropout), drawn, jnp.int32(max_streams))


def loss_and_grads(model: ESC, params, batch, num_streams, freeze, loss_weights=None):
  """Training loss and its gradient: ((loss, terms), grads).

  Args:
    batch: (B, L) float32 audio of a valid length.
    num_streams: int32 scalar (traced); freeze: bool scalar (traced pre-training flag).
    loss_weights: cm/cb/mel/stft weights (config.loss).
  Returns: scalar loss, dict of per-item terms (B,), grads shaped like params.
  """
  def fn(p):
    out = model.apply({"params": p}, batch, num_streams, train=True, freeze_codebook=freeze)
    return codec_loss(out, batch, loss_weights)
  return jax.value_and_grad(fn, has_aux=True)(params)


def make_train_step(model: ESC, tx: optax.GradientTransformation, schedule, config):
  """Pure `step(state, batch) -> (state, metrics)`; jit it once for the whole run."""
  base_key = jax.random.PRNGKey(int(config.seed))
  pretrain = int(config.train.pretrain_steps)
  p_drop = float(config.train.quant_dropout)
  weights = dict(config.loss)
  max_s = model.max_streams

  def step_fn(state: TrainState, batch):
    step = state.step
    freeze = step < pretrain
    num_streams = sample_num_streams(jax.random.fold_in(base_key, step), p_drop, max_s)
    num_streams = jnp.where(freeze, jnp.int32(max_s), num_streams)
    (loss, terms), grads = loss_and_grads(model, state.params, batch, num_streams, freeze, weights)
    # The original re-creates its optimizer when pre-training ends: fresh moments.
    opt_state = state.opt_state
    if pretrain > 0:
      fresh = tx.init(state.params)
      opt_state = jax.tree.map(lambda f, o: jnp.where(step == pretrain, f, o), fresh, opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    lr = schedule(step)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    out = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr, num_streams=num_streams,
               pretrain=freeze.astype(jnp.int32), **{k: jnp.mean(v) for k, v in terms.items()})
    return TrainState(step + 1, params, opt_state), out

  return step_fn


# --------------------------------------------------------------------------
# Validation (could move into esc_jax/evaluation.py's "evaluate a codec on clips")
# --------------------------------------------------------------------------


def make_eval_fn(model: ESC, num_streams: int):
  """jit (params, (B, L) audio) -> dict recon (B, L), codes, mel_distance (B,), si_sdr (B,)."""
  def fn(params, x):
    out = model.apply({"params": params}, x, int(num_streams))
    y = out["recon_audio"]
    return dict(recon=y, codes=out["codes"], mel_distance=losses.mel_distance(x, y),
                si_sdr=metrics_lib.si_sdr(x, y))
  return jax.jit(fn)


def validate(eval_fn, params, clips: np.ndarray, batch_size: int, codebook_size: int) -> dict:
  """Mean PESQ (wb), mel distance, SI-SDR and bitrate utilisation over `clips` (N, L)."""
  pesq, mel, sdr, codes = [], [], [], []
  for x, n in data_lib.batches(clips, batch_size):
    out = jax.device_get(eval_fn(params, x))
    pesq.append(metrics_lib.pesq_wb(x[:n], out["recon"][:n]))
    mel.append(out["mel_distance"][:n])
    sdr.append(out["si_sdr"][:n])
    codes.append(out["codes"][:n])
  pesq = np.concatenate(pesq)
  return dict(pesq=float(np.nanmean(pesq)) if np.any(np.isfinite(pesq)) else float("nan"),
              mel_distance=float(np.mean(np.concatenate(mel))),
              si_sdr=float(np.mean(np.concatenate(sdr))),
              utilization=metrics_lib.bitrate_utilization(np.concatenate(codes), codebook_size))


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------


class MetricWriter:
  """metrics.jsonl + TensorBoard (+ wandb) on process 0; rows past `start_step` are dropped on resume."""

  def __init__(self, workdir: pathlib.Path, config, start_step: int):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.tb = self.wandb = None
    if not self.active:
      return
    if self.path.exists():  # a killed run may have logged steps past its last checkpoint
      keep = [l for l in self.path.read_text().splitlines() if l.strip() and _row_step(l) <= start_step]
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text("".join(l + "\n" for l in keep))
      os.replace(tmp, self.path)
    if config.log.tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    if config.log.wandb:
      import wandb  # optional dependency, only when asked for
      self.wandb = wandb.init(project=config.log.get("wandb_project", "esc_jax"), dir=str(workdir),
                              config=config.to_dict(), resume="allow", id=_wandb_id(workdir))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train"):
    if not self.active:
      return
    row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
    if self.wandb is not None:
      self.wandb.log(row, step=int(step))

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return 1 << 62


def _wandb_id(workdir: pathlib.Path) -> str:
  f = workdir / "wandb_id.txt"
  if not f.exists():
    f.write_text(os.urandom(6).hex())
  return f.read_text().strip()


# --------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------

_COMPILED: dict[str, Any] = {}  # one jitted function per (program, mesh) in this process


def _memo(key: str, build: Callable[[], Any]):
  if key not in _COMPILED:
    _COMPILED[key] = build()
  return _COMPILED[key]


def _host(tree):
  """Replicated jax arrays -> numpy (this process's copy)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _plain(c) -> Any:
  return ckpt_lib._plain(c)  # pylint: disable=protected-access


class Trainer:
  """Owns the mesh, the compiled step, the checkpoint manager and the data.

  Args:
    config: an ml_collections config (see esc_jax.config_lib.base_config).
    workdir: run directory; an existing run there is resumed.
    data: optional iterator of (local_batch, clip_samples) arrays replacing the
      folder pipeline (tests, benchmarks); its position is saved only if it has
      `get_state` / `set_state`.
  """

  def __init__(self, config, workdir, data: Iterator[np.ndarray] | None = None):
    self.config = config
    self.workdir = pathlib.Path(workdir).absolute()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.train.compute_dtype)
    if dtype is None:
      raise ConfigError(f"train.compute_dtype {config.train.compute_dtype!r}: expected float32 | bfloat16")
    self.model = make_model(config.model, config.model_name, dtype=dtype)
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    n_dev, bs = self.mesh.size, int(config.train.batch_size)
    if bs % n_dev or bs % jax.process_count():
      raise ConfigError(f"train.batch_size {bs} must be divisible by the {n_dev} devices "
                       f"and {jax.process_count()} processes")
    self.tx = make_optimizer(config.optim)
    self.schedule = make_schedule(config.optim, int(config.train.num_steps))
    key = json.dumps(dict(model=_plain(config.model), name=config.model_name, loss=_plain(config.loss),
                          optim=_plain(config.optim), seed=config.seed, dtype=config.train.compute_dtype,
                          pretrain=config.train.pretrain_steps, qd=config.train.quant_dropout,
                          steps=config.train.num_steps, mesh=[d.id for d in self.mesh.devices.flat]),
                     sort_keys=True)
    self.train_step = _memo("step" + key, lambda: jax.jit(
        make_train_step(self.model, self.tx, self.schedule, config),
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0))
    self._init = _memo("init" + key, lambda: jax.jit(self._init_params))
    self._data = data
    self.manager = self._make_manager()
    self._write_codec_config()

  # ---- state ----
  def _init_params(self, key):
    x = jnp.zeros((1, int(self.config.data.clip_samples)), jnp.float32)
    return self.model.init(key, x)["params"]

  def init_state(self) -> TrainState:
    """Fresh params (from config.seed) and optimizer state, replicated over the mesh."""
    # The XLA RngBitGenerator compiles ~3x faster than threefry on CPU for the
    # hundreds of initialisers; init values are reproducible per platform.
    key = jax.random.key(int(self.config.seed), impl="unsafe_rbg")
    params = self._init(key)
    state = TrainState(jnp.int32(0), params, self.tx.init(params))
    return jax.device_put(state, self.replicated)

  def _abstract_state(self) -> TrainState:
    params = jax.eval_shape(self._init_params, jax.random.key(0, impl="unsafe_rbg"))
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(self.tx.init, params))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  # ---- checkpoints ----
  def _make_manager(self) -> ocp.CheckpointManager:
    pp = ocp.checkpoint_managers
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(1, int(self.config.ckpt.keep))),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode="max",
        enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(self.workdir / ckpt_lib.CKPT_DIR, options=options)

  def _write_codec_config(self):
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / ckpt_lib.CONFIG_FILE
    cfg = {"model_name": self.config.model_name, "model": _plain(self.config.model),
           "best_metric": {"name": BEST_METRIC, "mode": "max"}}
    if path.exists():
      old = ckpt_lib.read_codec_config(self.workdir)
      if old.get("model") != cfg["model"] or old.get("model_name") != cfg["model_name"]:
        raise ConfigError(f"{self.workdir} holds a run of a different model ({path}); "
                         "use another --workdir or the same model config")
      return
    if jax.process_index() == 0:
      ckpt_lib.write_json_atomic(path, cfg)
      ckpt_lib.write_json_atomic(self.workdir / "config.json", _plain(self.config))

  def save(self, state: TrainState, data_iter=None, val_metrics: Mapping[str, float] | None = None):
    """Checkpoint `state` at step state.step (params, opt_state, meta)."""
    step = int(jax.device_get(state.step))
    meta = dict(step=step, seed=int(self.config.seed), process_count=jax.process_count(),
                num_workers=int(self.config.data.num_workers),
                data_state=data_iter.get_state() if hasattr(data_iter, "get_state") else None)
    ok = val_metrics is not None and math.isfinite(val_metrics.get(BEST_METRIC, float("nan")))
    self.manager.save(step, args=ocp.args.Composite(**{
        # Params as host arrays: no device topology in the checkpoint, so
        # `esc_jax.load` restores them on any machine (a 1-CPU laptop included).
        ckpt_lib.PARAMS_ITEM: ocp.args.StandardSave(_host(state.params)),
        OPT_ITEM: ocp.args.StandardSave(state.opt_state),
        META_ITEM: ocp.args.JsonSave(meta)}),
        metrics={k: float(v) for k, v in val_metrics.items()} if ok else None, force=True)
    self.manager.wait_until_finished()

  def restore(self, data_iter=None) -> TrainState | None:
    """The latest checkpoint (and the data position), or None for a fresh run."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = self._abstract_state()
    r = self.manager.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.PARAMS_ITEM: ocp.args.StandardRestore(target.params),
        OPT_ITEM: ocp.args.StandardRestore(target.opt_state),
        META_ITEM: ocp.args.JsonRestore()}))
    meta = r[META_ITEM]
    if meta.get("seed") != int(self.config.seed):
      logging.warning("resuming a run started with seed %s under seed %s", meta.get("seed"), self.config.seed)
    if data_iter is not None and hasattr(data_iter, "set_state"):
      if meta.get("data_state") is None:
        raise ConfigError(f"checkpoint {step} has no data-iterator state to resume from")
      if meta.get("num_workers") != int(self.config.data.num_workers):  # the state's layout depends on it
        raise ConfigError(f"checkpoint {step} was written with data.num_workers={meta.get('num_workers')}; "
                          f"resume with --config.data.num_workers={meta.get('num_workers')}")
      data_iter.set_state(meta["data_state"])
    state = TrainState(jnp.int32(meta["step"]), r[ckpt_lib.PARAMS_ITEM], r[OPT_ITEM])
    return jax.device_put(state, self.replicated)

  # ---- data ----
  def data_iterator(self):
    if self._data is not None:
      return self._data
    c = self.config
    if not c.data.train_dir:
      raise data_lib.DataError("config.data.train_dir is empty: pass --config.data.train_dir=FOLDER")
    return data_lib.train_iterator(c.data.train_dir, int(c.data.clip_samples), int(c.train.batch_size),
                                   int(c.seed), int(c.data.num_workers), sample_rate=int(c.data.sample_rate))

  def global_batch(self, local: np.ndarray) -> jax.Array:
    """This process's (B/P, L) rows -> the (B, L) batch sharded over the mesh."""
    local = np.asarray(local, np.float32)
    shape = (local.shape[0] * jax.process_count(), local.shape[1])
    return jax.make_array_from_process_local_data(self.batch_sharding, local, shape)

  # ---- validation ----
  def evaluate(self, params, clips: np.ndarray) -> dict:
    c = self.config
    fn = _memo(f"eval{c.eval.num_streams}" + json.dumps(_plain(c.model), sort_keys=True) + c.train.compute_dtype,
               lambda: make_eval_fn(self.model, int(c.eval.num_streams)))
    local = jax.tree.map(lambda a: a.addressable_data(0), params)  # eval runs on one local device
    return validate(fn, local, clips, int(c.eval.batch_size), self.model.codebook_size)

  # ---- the loop ----
  def run(self, until: int | None = None) -> TrainState:
    """Train (resuming from the workdir) to step `until` (default train.num_steps)."""
    from tqdm import tqdm

    c = self.config
    num_steps = int(c.train.num_steps) if until is None else min(int(until), int(c.train.num_steps))
    self._lock()
    it = self.data_iterator()
    state = self.restore(it)
    if state is None:
      state = self.init_state()
      logging.info("new run in %s (%d parameters)", self.workdir,
                   sum(int(p.size) for p in jax.tree.leaves(state.params)))
    start = int(jax.device_get(state.step))
    if start:
      logging.info("resumed %s at step %d", self.workdir, start)
    clips = None
    if c.data.val_dir:
      clips = data_lib.load_clips(c.data.val_dir, int(c.data.clip_samples), int(c.data.val_max_files),
                                  int(c.data.sample_rate))[0]
    writer = MetricWriter(self.workdir, c, start)
    per_stream = kbps_per_stream(self.model)
    pbar = tqdm(total=int(c.train.num_steps), initial=start, dynamic_ncols=True,
                disable=jax.process_index() != 0, desc="train")
    acc: dict[str, list[float]] = {}
    busy, n_timed = 0.0, 0  # seconds in data + step (validation, checkpoints, compilation excluded)
    try:
      for step in range(start, num_steps):
        t0 = time.perf_counter()
        state, m = self.train_step(state, self.global_batch(next(it)))
        m = jax.device_get(m)
        if step > start:
          busy, n_timed = busy + time.perf_counter() - t0, n_timed + 1
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
          last = self.manager.latest_step()
          raise NonFiniteLossError(
              f"non-finite loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} at step {step} "
              f"(num_streams={int(m['num_streams'])}, pretrain={bool(m['pretrain'])}); stopped without "
              f"saving it. Last good checkpoint: "
              f"{'step %d in %s' % (last, self.manager.directory) if last is not None else 'none'}")
        m["kbps"] = 0.0 if m["pretrain"] else float(m["num_streams"]) * per_stream
        for k, v in m.items():
          acc.setdefault(k, []).append(float(v))
        n = step + 1
        pbar.update(1)
        if n % int(c.log.every_steps) == 0 or n == num_steps:
          row = {k: float(np.mean(v)) for k, v in acc.items()}
          if n_timed:
            row["steps_per_sec"] = n_timed / max(busy, 1e-9)
          writer.write(n, row)
          pbar.set_postfix(loss=f"{row['loss']:.4f}", kbps=f"{row['kbps']:.1f}",
                           steps_s=f"{row.get('steps_per_sec', float('nan')):.2f}", refresh=False)
          acc, busy, n_timed = {}, 0.0, 0
        val = None
        if (clips is not None and n > int(c.train.pretrain_steps)
            and (n % int(c.eval.every_steps) == 0 or n == int(c.train.num_steps))):
          val = self.evaluate(state.params, clips)
          writer.write(n, val, prefix="val")
          logging.info("step %d validation at %d streams: %s", n, c.eval.num_streams,
                       " ".join(f"{k}={v:.4f}" for k, v in val.items()))
        if n % int(c.ckpt.every_steps) == 0 or n == num_steps or val is not None:
          self.save(state, it, val)
    finally:
      pbar.close()
      writer.close()
      if self._data is None and hasattr(it, "close"):
        it.close()
    if self.train_step._cache_size() != 1:  # pylint: disable=protected-access
      logging.error("the train step compiled %d times (expected once)", self.train_step._cache_size())
    return state

  def _lock(self):
    """One training process per workdir (per process index); released when the process ends."""
    import fcntl
    if getattr(self, "_lock_file", None) is not None:
      return
    f = open(self.workdir / f".train_lock.{jax.process_index()}", "w")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.close()
      raise ConfigError(f"another training process is running in {self.workdir}") from None
    self._lock_file = f

  def close(self):
    self.manager.close()
    if getattr(self, "_lock_file", None) is not None:
      self._lock_file.close()
      self._lock_file = None


def best_step(workdir) -> int | None:
  """Step of the best checkpoint by validation PESQ (None if no step has metrics)."""
  opts = ocp.CheckpointManagerOptions(best_fn=lambda m: m[BEST_METRIC], best_mode="max", create=False)
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / ckpt_lib.CKPT_DIR, options=opts) as m:
    with_metrics = [s for s in m.all_steps() if m.metrics(s)]
    return m.best_step() if with_metrics else None
