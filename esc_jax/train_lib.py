"""Training ESC (the original's recipe, plain or adversarial) as plain functions.

  program = build(config)                       # model, optimizer, mesh, compiled step
  state = train_and_evaluate(config, workdir)   # the whole run, resumable

Recipe (SPEC "Losses and training recipe"): loss `objective.codec_loss`; AdamW
(b1 .9, b2 .999, eps 1e-8, weight decay .01) after global-norm clipping (0.5),
lr 1e-4 constant (or warmup_cosine / exponential); quantisation dropout: with
probability `train.quant_dropout` num_streams ~ U{1..max_streams}, else all,
drawn inside the step from fold_in(PRNGKey(seed), step); steps < pretrain_steps
bypass the codebooks. Like the original, the optimizer is renewed (fresh Adam
moments) once pre-training is over, before step pretrain_steps + 1: the first
quantised step still uses the pre-training moments. num_streams and the phase
are traced values, so one compiled step serves the whole run.

Adversarial recipe (ESC-Base(adv), a config with a `discriminator` section):
after pre-training the generator loss adds the least-squares GAN and feature-
matching terms of the DAC discriminator (`objective.generator_adv_terms`),
then the discriminator takes its own step (AdamW `disc_optim`, its own clip)
on the same step's reconstruction, detached; during pre-training neither runs
(`lax.cond` on the traced phase, so one program still serves both phases).

Parallelism: a 1-D mesh "data" over all devices (all processes); the global
batch is sharded along it, params and optimizer state are replicated. The
step is compiled ahead of time for the run's shapes (`build`), so it cannot
silently recompile. Checkpoints: `esc_jax.checkpoint` (items "params",
"opt_state", "meta", plus "batch_stats" for the convolution variants and
"disc_params" / "disc_opt_state" for the adversarial recipe); WORKDIR/esc_config.json makes WORKDIR a codec directory
for `esc_jax.load`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esc_jax import checkpoint as ckpt
from esc_jax import data as data_lib
from esc_jax import evaluation
from esc_jax import kernels
from esc_jax import runtime
from esc_jax.api import Codec
from esc_jax.codec import make_model
from esc_jax.files import write_json_atomic
from esc_jax.discriminator import make_discriminator
from esc_jax.metric_writer import open_writer
from esc_jax.objective import DEFAULT_WEIGHTS, codec_loss, discriminator_loss, generator_adv_terms

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
VAL_METRICS = ("pesq", "mel_distance", "si_sdr")  # validation metrics (plus utilisation)


class ConfigError(ValueError):
  """A config or workdir that cannot be trained (one clear line)."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; nothing of that step was saved."""


# ---------------------------------------------------------------------------
# Optimizer and the pure train step
# ---------------------------------------------------------------------------


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


def make_optimizer(optim, flat: bool = True) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with unit learning rate (the step scales by lr(step)).

  The learning rate follows the global step, so renewing the optimizer after
  pre-training resets Adam's moments and bias correction but not the schedule.

  flat (the default): the optimizer sees all parameters as one vector (in
  `jax.tree.leaves` order; `optax.flatten`), and its state holds Adam's moments as
  such vectors. The arithmetic is the same per element; the global norm is one sum
  instead of a sum of per-tensor sums (float32 rounding). Per tensor, the ~400 tensors
  of ESC made the optimizer over half of the train step's ops (~50 per tensor) and
  8-13 s of ESC-Base's compile time. flat=False: the per-tensor state that checkpoints
  of esc-jax before the flat optimizer hold (see `restore`).
  """
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim.clip_norm)),
      optax.adamw(1.0, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                  weight_decay=float(optim.weight_decay)))
  return optax.flatten(tx) if flat else tx


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: steps completed
  params: Any
  opt_state: Any
  disc_params: Any = None  # the discriminator of the adversarial recipe (None otherwise)
  disc_opt_state: Any = None
  batch_stats: Any = None  # BatchNorm running statistics of the convolution variants (None otherwise)


def sample_num_streams(key, quant_dropout: float, max_streams: int) -> jnp.ndarray:
  """With probability quant_dropout U{1..max_streams}, else max_streams (int32 scalar)."""
  k_do, k_s = jax.random.split(key)
  drawn = jax.random.randint(k_s, (), 1, max_streams + 1, dtype=jnp.int32)
  return jnp.where(jax.random.bernoulli(k_do, quant_dropout), drawn, jnp.int32(max_streams))


def loss_and_grads(model, params, batch, num_streams, freeze, loss_weights=None, disc=None, disc_params=None,
                   batch_stats=None):
  """Generator loss and its gradient: ((loss, aux), grads).

  Args:
    batch: (B, L) float32 audio of a valid length.
    num_streams: int32 scalar (traced); freeze: bool scalar (traced pre-training flag).
    loss_weights: the `loss` weights (config.loss).
    disc, disc_params: the discriminator of the adversarial recipe, or None.
    batch_stats: BatchNorm statistics (convolution variants), or None.
  Returns: scalar loss; aux = dict(terms: per-item terms (B,), recon: the
    reconstruction (B, L), batch_stats: the updated statistics or None);
    grads shaped like params.
  """
  w = dict(DEFAULT_WEIGHTS, **(loss_weights or {}))

  def fn(p):
    if batch_stats is None:
      out, new_stats = model.apply({"params": p}, batch, num_streams, train=True, freeze_codebook=freeze), None
    else:  # batch statistics of the (global) batch; running statistics updated (momentum 0.1)
      out, upd = model.apply({"params": p, "batch_stats": batch_stats}, batch, num_streams, train=True,
                             freeze_codebook=freeze, mutable=["batch_stats"])
      new_stats = upd["batch_stats"]
    loss, terms = codec_loss(out, batch, w)
    recon = out["recon_audio"]
    if disc is not None:  # adversarial terms after pre-training only
      zeros = jnp.zeros(batch.shape[:1], jnp.float32)
      adv = jax.lax.cond(freeze, lambda: dict(gen_loss=zeros, feat_loss=zeros),
                         lambda: generator_adv_terms(disc, disc_params, batch, recon))
      loss = loss + jnp.mean(w["gen_weight"] * adv["gen_loss"] + w["feat_weight"] * adv["feat_loss"])
      terms = {**terms, **adv}
    return loss, dict(terms=terms, recon=recon, batch_stats=new_stats)
  return jax.value_and_grad(fn, has_aux=True)(params)


def _apply(tx, schedule, step, grads, opt_state, params, renew=None):
  """One optimizer update at learning rate schedule(step): (params, opt_state, |grads|).

  renew: traced bool, or None: update from a fresh optimizer state instead of `opt_state`.
  With `make_optimizer`'s flat state this is a few dozen ops on whole vectors.
  """
  if renew is not None:
    opt_state = jax.tree.map(lambda f, o: jnp.where(renew, f, o), tx.init(params), opt_state)
  updates, opt_state = tx.update(grads, opt_state, params)
  lr = schedule(step)
  params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
  return params, opt_state, optax.tree.norm(jax.flatten_util.ravel_pytree(grads)[0])


def make_train_step(model, tx: optax.GradientTransformation, schedule, config, disc=None,
                    disc_tx: optax.GradientTransformation | None = None, disc_schedule=None):
  """Pure `step(state, batch) -> (state, metrics)`; compile it once for the whole run.

  With `disc` (adversarial recipe) the step also updates the discriminator
  after pre-training: D(stop_gradient(reconstruction)) against D(batch).
  """
  base_key = jax.random.PRNGKey(int(config.seed))
  pretrain = int(config.train.pretrain_steps)
  p_drop = float(config.train.quant_dropout)
  weights = dict(config.loss)
  max_s = model.max_streams

  def disc_step(state, batch, recon, freeze):
    def update():
      loss, grads = jax.value_and_grad(lambda dp: discriminator_loss(disc, dp, batch, recon))(state.disc_params)
      params, opt_state, norm = _apply(disc_tx, disc_schedule, state.step, grads, state.disc_opt_state,
                                       state.disc_params)
      return params, opt_state, loss, norm
    skip = lambda: (state.disc_params, state.disc_opt_state, jnp.float32(0), jnp.float32(0))
    return jax.lax.cond(freeze, skip, update)

  def step_fn(state: TrainState, batch):
    step = state.step
    freeze = step < pretrain
    num_streams = sample_num_streams(jax.random.fold_in(base_key, step), p_drop, max_s)
    num_streams = jnp.where(freeze, jnp.int32(max_s), num_streams)
    (loss, aux), grads = loss_and_grads(model, state.params, batch, num_streams, freeze, weights,
                                        disc, state.disc_params, state.batch_stats)
    terms, recon = aux["terms"], aux["recon"]
    # The original renews its optimizer before step pretrain + 1.
    renew = step == pretrain + 1 if pretrain > 0 else None
    params, opt_state, grad_norm = _apply(tx, schedule, step, grads, state.opt_state, state.params, renew)
    out = dict(loss=loss, grad_norm=grad_norm, lr=schedule(step), num_streams=num_streams,
               pretrain=freeze.astype(jnp.int32), **{k: jnp.mean(v) for k, v in terms.items()})
    new = TrainState(step + 1, params, opt_state, batch_stats=aux["batch_stats"])
    if disc is not None:
      d_params, d_opt, out["disc_loss"], out["disc_grad_norm"] = disc_step(state, batch, recon, freeze)
      new = new.replace(disc_params=d_params, disc_opt_state=d_opt)
    return new, out

  return step_fn


# ---------------------------------------------------------------------------
# Building a run: model, optimizer, mesh, compiled step, initial state
# ---------------------------------------------------------------------------


def xla_cost(stage, key: str = "flops") -> float:
  """XLA's cost-analysis entry `key` ("flops", "bytes accessed") of a lowered or compiled
  program; NaN where it is missing. FLOP of a lowered program are the same on every
  platform; a compiled GPU program's counts leave out its cuBLAS/cuDNN calls."""
  ca = stage.cost_analysis()
  if ca is None and isinstance(stage, jax.stages.Lowered):
    ca = _cpu_cost_analysis(stage)
  ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
  return float(ca.get(key, float("nan")))


def _cpu_cost_analysis(lowered) -> dict | None:
  """XLA:CPU's analysis of a lowered program's HLO, for backends behind the PJRT C API
  (jax's CUDA plugin), whose `Lowered.cost_analysis` is None. Private JAX API: None
  where it has moved."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
  except Exception:  # noqa: BLE001 - a count for reports only
    return None


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything compiled for one model, recipe, batch shape and mesh (see `build`)."""
  config: Any
  model: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  step: Any  # compiled (state, global batch) -> (state, metrics); donates the state
  init_variables: Callable  # jitted key -> model variables {"params", maybe "batch_stats"}
  abstract_state: TrainState  # shapes, dtypes and shardings of the state
  compile_s: float  # seconds spent compiling the step (little when loaded from the persistent cache)
  lower_reference: Callable[[], Any]  # () -> the step lowered without the CPU kernels: see step_flops
  disc: Any = None  # the discriminator (adversarial recipe) or None
  disc_tx: optax.GradientTransformation | None = None
  init_disc_params: Callable | None = None  # jitted key -> discriminator params

  @property
  def adversarial(self) -> bool:
    return self.disc is not None

  @functools.cached_property
  def step_flops(self) -> float:
    """FLOP of one step: XLA's count of the program before optimisation, traced without
    the fused CPU kernels (`esc_jax.kernels`, whose custom calls XLA counts as nothing).
    The same on every platform; a compiled GPU program's count leaves out its
    cuBLAS/cuDNN calls. Traces and lowers the step again (seconds) on first use."""
    return xla_cost(self.lower_reference())

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))


def build(config, devices=None) -> Program:
  """Model, optimizer, mesh and the sharded train step compiled for `config`'s shapes.

  Args:
    config: an ml_collections config (esc_jax.config_lib.base_config).
    devices: mesh devices (default: all devices of all processes).
  Raises ConfigError for settings that cannot be trained.
  """
  dtype = COMPUTE_DTYPES.get(config.train.compute_dtype)
  if dtype is None:
    raise ConfigError(f"train.compute_dtype {config.train.compute_dtype!r}: expected "
                      f"{' | '.join(COMPUTE_DTYPES)}")
  for section in ("log", "ckpt"):
    if int(config[section].every_steps) < 1:
      raise ConfigError(f"{section}.every_steps must be >= 1, got {config[section].every_steps}")
  try:
    model = make_model(config.model, config.model_name, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None
  length = int(config.data.clip_samples)
  if model.valid_length(length) != length:
    raise ConfigError(f"data.clip_samples {length} is not a valid length for the model; use "
                      f"{model.largest_valid_length(length)} or {model.valid_length(length)}")
  mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))
  bs = int(config.train.batch_size)
  if bs % mesh.size or bs % jax.process_count():
    raise ConfigError(f"train.batch_size {bs} must be divisible by the {mesh.size} devices "
                      f"and {jax.process_count()} processes")
  tx = make_optimizer(config.optim)
  schedule = make_schedule(config.optim, int(config.train.num_steps))
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  x0 = jnp.zeros((1, length), jnp.float32)
  key0 = jax.random.key(0, impl="unsafe_rbg")

  def init_variables(key):
    return model.init(key, x0)

  variables = ckpt.model_template(model)  # init's shapes (traced once per model config and process)
  params = variables["params"]
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params),
                      batch_stats=variables.get("batch_stats"))
  disc = disc_tx = disc_schedule = init_disc = None
  if "discriminator" in config:
    try:
      disc = make_discriminator(config.discriminator.to_dict(), dtype=dtype)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.discriminator: {e}") from None
    disc_tx = make_optimizer(config.disc_optim)
    disc_schedule = make_schedule(config.disc_optim, int(config.train.num_steps))
    init_disc = lambda key: disc.init(key, x0)["params"]  # noqa: E731
    d_params = jax.eval_shape(init_disc, key0)
    shapes = shapes.replace(disc_params=d_params, disc_opt_state=jax.eval_shape(disc_tx.init, d_params))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  batch = jax.ShapeDtypeStruct((bs, length), jnp.float32, sharding=shard)

  def lower():
    # The CPU kernels' custom calls have no partitioning rule: with the batch sharded over
    # several devices XLA would all-gather it around each call, so that step is plain XLA.
    with kernels.disabled() if mesh.size > 1 else contextlib.nullcontext():
      return jax.jit(make_train_step(model, tx, schedule, config, disc, disc_tx, disc_schedule),
                     in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0).lower(abstract, batch)

  def lower_reference():
    with kernels.disabled():
      return lower()

  t = time.perf_counter()
  step = lower().compile()
  compile_s = time.perf_counter() - t
  return Program(config, model, tx, mesh, step, jax.jit(init_variables, out_shardings=rep), abstract, compile_s,
                 lower_reference, disc, disc_tx, None if disc is None else jax.jit(init_disc, out_shardings=rep))


def init_state(program: Program, variables=None) -> TrainState:
  """Step 0: fresh model variables from config.seed (or the given `variables`:
  {"params", maybe "batch_stats"}) and a fresh optimizer (and a fresh
  discriminator, from the seed too, in the adversarial recipe)."""
  # The XLA RngBitGenerator compiles ~3x faster than threefry on CPU for the
  # hundreds of initialisers; init values are reproducible per platform.
  key = jax.random.key(int(program.config.seed), impl="unsafe_rbg")
  if variables is None:
    variables = program.init_variables(key)
  variables = jax.device_put(dict(variables), program.replicated)
  params = variables["params"]
  init_opt = lambda tx, p: jax.jit(tx.init, out_shardings=program.replicated)(p)  # noqa: E731
  state = TrainState(jnp.int32(0), params, init_opt(program.tx, params), batch_stats=variables.get("batch_stats"))
  if program.adversarial:
    d_params = program.init_disc_params(jax.random.fold_in(key, 1))
    state = state.replace(disc_params=d_params, disc_opt_state=init_opt(program.disc_tx, d_params))
  return state


def global_batch(program: Program, local: np.ndarray) -> jax.Array:
  """This process's (B/P, L) rows -> the (B, L) batch sharded over the mesh."""
  local = np.asarray(local, np.float32)
  shape = (local.shape[0] * jax.process_count(), local.shape[1])
  return jax.make_array_from_process_local_data(program.batch_sharding, local, shape)


def host_variables(state: TrainState) -> dict:
  """The model's variables ({"params", maybe "batch_stats"}) as numpy (this process's copy of
  the replicated arrays): topology-free, loadable anywhere."""
  tree = {"params": state.params}
  if state.batch_stats is not None:
    tree["batch_stats"] = state.batch_stats
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a), tree)


# ---------------------------------------------------------------------------
# Checkpoints of a run
# ---------------------------------------------------------------------------


def save(mngr, state: TrainState, config, data_iter=None, val_metrics=None) -> None:
  """Checkpoints `state` (params, opt_state, meta with the data position).

  Every process calls it (orbax saves collectively). The JSON meta is written by
  process 0 and restored on all: each process has consumed the same number of
  local batches, so its iterator's position equals process 0's.
  """
  step = int(jax.device_get(state.step))
  meta = dict(step=step, seed=int(config.seed), process_count=jax.process_count(),
              num_workers=int(config.data.num_workers),
              data_state=data_iter.get_state() if hasattr(data_iter, "get_state") else None)
  items = {**host_variables(state), "opt_state": state.opt_state}
  if state.disc_params is not None:
    items.update(disc_params=state.disc_params, disc_opt_state=state.disc_opt_state)
  ckpt.save_step(mngr, step, items, meta, val_metrics)


def restore(mngr, program: Program, config, data_iter=None) -> TrainState | None:
  """The latest checkpoint of the run (and the data position), or None for a fresh run."""
  step = mngr.latest_step()
  if step is None:
    return None
  a = program.abstract_state
  targets = {ckpt.PARAMS_ITEM: a.params, "opt_state": a.opt_state}
  if a.batch_stats is not None:
    targets["batch_stats"] = a.batch_stats
  if program.adversarial:
    targets.update(disc_params=a.disc_params, disc_opt_state=a.disc_opt_state)
  try:
    items, meta = ckpt.restore_step(mngr, step, targets)
  except ckpt.CheckpointError as e:
    items, meta = _restore_per_tensor_optimizer(mngr, step, targets, program, e)
  c = config
  if meta.get("seed") != int(c.seed):
    logging.warning("resuming a run started with seed %s under seed %s", meta.get("seed"), c.seed)
  if data_iter is not None and hasattr(data_iter, "set_state"):
    if meta.get("data_state") is None:
      raise ConfigError(f"checkpoint {step} has no data-iterator state to resume from")
    if meta.get("num_workers") != int(c.data.num_workers):  # the state's layout depends on it
      raise ConfigError(f"checkpoint {step} was written with data.num_workers={meta.get('num_workers')}; "
                        f"resume with --config.data.num_workers={meta.get('num_workers')}")
    if meta.get("process_count", jax.process_count()) != jax.process_count():  # each process's shard
      raise ConfigError(f"checkpoint {step} was written by {meta['process_count']} processes; the data "
                        f"position cannot be resumed by {jax.process_count()} (resume with as many)")
    data_iter.set_state(meta["data_state"])
  return TrainState(jnp.int32(meta["step"]), items[ckpt.PARAMS_ITEM], items["opt_state"],
                    items.get("disc_params"), items.get("disc_opt_state"), items.get("batch_stats"))


def _restore_per_tensor_optimizer(mngr, step: int, targets: dict, program: Program, error: Exception):
  """Restores a checkpoint whose optimizer states have the per-tensor layout of esc-jax
  before the flat optimizer (`make_optimizer(flat=False)`) and flattens them: the same
  numbers, so the run resumes exactly. Raises `error` if that fails too."""
  a = program.abstract_state
  optims = {"opt_state": (program.config.optim, a.params, a.opt_state)}
  if program.adversarial:
    optims["disc_opt_state"] = (program.config.disc_optim, a.disc_params, a.disc_opt_state)
  rep = program.replicated
  legacy = {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                            jax.eval_shape(make_optimizer(optim, flat=False).init, params))
            for k, (optim, params, _) in optims.items()}
  try:
    items, meta = ckpt.restore_step(mngr, step, {**targets, **legacy})
  except ckpt.CheckpointError:
    raise error from None
  for k, (_, _, flat) in optims.items():
    # The flat state's structure is a prefix of the per-tensor one: each flat moment
    # meets the tree of its tensors; the step counts meet themselves.
    items[k] = jax.tree.map(lambda f, o: jax.device_put(
        jax.flatten_util.ravel_pytree(o)[0] if f.ndim else o, f.sharding), flat, items[k])
  logging.info("checkpoint %d: per-tensor optimizer state flattened", step)
  return items, meta


def init_from(program: Program, directory) -> TrainState:
  """Step 0 from a codec directory's variables (converted release or own run), fresh optimizer."""
  c = program.config
  if not pathlib.Path(directory).is_dir():
    raise ConfigError(f"train.init_from {directory}: no such codec directory")
  if not _same_model(ckpt.read_codec_config(directory), c):
    raise ConfigError(f"train.init_from {directory} holds a different model than config.model")
  variables = ckpt.restore_variables(directory, program.model)
  logging.info("initialised from %s", directory)
  return init_state(program, variables)


def _same_model(codec_config: dict, config) -> bool:
  """Whether a codec directory's config describes config.model (whatever keywords are spelled out)."""
  try:
    return (make_model(codec_config["model"], codec_config.get("model_name", "csvq+swinT"))
            == make_model(config.model, config.model_name))
  except (TypeError, ValueError):
    return False


def write_run_config(workdir, config) -> None:
  """WORKDIR/esc_config.json (a codec directory) and config.json; ConfigError for another model's run."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / ckpt.CONFIG_FILE
  cfg = ckpt.codec_config(config.model, config.model_name)
  if path.exists():
    if not _same_model(ckpt.read_codec_config(workdir), config):
      raise ConfigError(f"{workdir} holds a run of a different model ({path}); "
                        "use another --workdir or the same model config")
    return
  if jax.process_index() == 0:
    write_json_atomic(path, cfg)
    write_json_atomic(workdir / "config.json", ckpt.plain(config))


@contextlib.contextmanager
def workdir_lock(workdir):
  """One training process per workdir (per process index)."""
  import fcntl
  with open(workdir / f".train_lock.{jax.process_index()}", "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise ConfigError(f"another training process is running in {workdir}") from None
    yield


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def load_validation_clips(config) -> dict[str, np.ndarray] | None:
  """Every file of data.val_dir (first channel, 16 kHz, full length; data.val_max_files caps it)."""
  if not config.data.val_dir:
    return None
  try:
    files = data_lib.find_audio_files(config.data.val_dir)
  except FileNotFoundError as e:
    raise data_lib.DataError(f"data.val_dir: {e}") from None
  cap = int(config.data.val_max_files)
  files = files[:cap] if cap > 0 else files
  names, clips, skipped = evaluation.load_clips(files, channel="first")
  for s in skipped:
    logging.warning("validation: skipping %s (%s)", s["name"], s["reason"])
  if not clips:
    raise data_lib.DataError(f"no readable audio files under {config.data.val_dir}")
  return dict(zip(names, clips))


def validate(program: Program, config, state: TrainState, clips) -> dict[str, float]:
  """The evaluator (`esc_jax.evaluation`) at eval.num_streams with the original's protocol.

  Each clip without its last hop and cut to a valid length (as the original's
  validation reads `x[0, :-80]`); returns mean PESQ, mel distance, SI-SDR and
  the bitrate utilisation. The evaluator's program is compiled once per model
  and clip shape, so repeated validations do not recompile.
  """
  c = config
  variables = host_variables(state)
  codec = Codec(program.model, variables.pop("params"), state=variables)
  r = evaluation.evaluate(codec, clips, num_streams=int(c.eval.num_streams), batch_size=int(c.eval.batch_size),
                          metrics=VAL_METRICS, fit="crop", progress=False)["bitrates"][0]
  return {**{m: r["mean"][m] for m in VAL_METRICS}, "utilization": r["utilization_exact"]}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _check_finite(m, step: int, mngr) -> None:
  if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
    return
  last = mngr.latest_step()
  raise NonFiniteLossError(
      f"non-finite loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} at step {step} "
      f"(num_streams={int(m['num_streams'])}, pretrain={bool(m['pretrain'])}); stopped without "
      f"saving it. Last good checkpoint: "
      f"{'step %d in %s' % (last, mngr.directory) if last is not None else 'none'}")


def _step_key(config) -> dict:
  """What the compiled step depends on (a `Program` serves any config with the same key)."""
  key = ckpt.plain({k: config[k] for k in ("seed", "model_name", "model", "loss", "optim", "train",
                                           "discriminator", "disc_optim") if k in config})
  key["train"].pop("init_from", None)  # read at start-up only
  return key | {"clip_samples": int(config.data.clip_samples)}


def train_and_evaluate(config, workdir, *, program: Program | None = None,
                       data: Iterator[np.ndarray] | None = None, until: int | None = None) -> TrainState:
  """Trains (resuming from WORKDIR/checkpoints) to step `until` (default train.num_steps).

  Args:
    config: the run's config; workdir: its directory (a codec directory too).
    program: a `build(config)` result to reuse (tests share one compile).
    data: an iterator of (local_batch, clip_samples) arrays replacing the
      folder pipeline (tests, benchmarks); its position is saved only if it
      has `get_state` / `set_state`.
  Returns the final train state.
  """
  from tqdm import tqdm

  c = config
  workdir = pathlib.Path(workdir).absolute()
  num_steps = int(c.train.num_steps) if until is None else min(int(until), int(c.train.num_steps))
  if c.train.init_from is None:  # a config that must start from a codec (the adversarial fine-tuning)
    raise ConfigError("this config starts from a trained codec: pass --config.train.init_from=CODEC_DIR")
  # 1. Model, mesh and the compiled step.
  if program is None:
    program = build(c)
  elif _step_key(program.config) != _step_key(c):
    raise ConfigError("the given program was built for another model, recipe or batch shape")
  runtime.sync_processes("compiled")  # before the first collective (see sync_processes)
  write_run_config(workdir, c)
  with workdir_lock(workdir), contextlib.closing(ckpt.train_manager(workdir, int(c.ckpt.keep))) as mngr:
    # 2. Data.
    epoch_steps = None
    if data is None:
      if not c.data.train_dir:
        raise data_lib.DataError("config.data.train_dir is empty: pass --config.data.train_dir=FOLDER")
      files = data_lib.scan_audio_files(c.data.train_dir)
      logging.info("training data: %d files under %s", len(files), c.data.train_dir)
      epoch_steps = data_lib.steps_per_epoch(len(files), int(c.train.batch_size))
      data = data_lib.train_iterator(files, int(c.data.clip_samples), int(c.train.batch_size), int(c.seed),
                                     int(c.data.num_workers), sample_rate=int(c.data.sample_rate))
    clips = load_validation_clips(c)
    val_every = int(c.eval.every_steps) or epoch_steps or int(c.train.num_steps)
    try:
      # 3-4. State: the latest checkpoint, else init_from or a fresh init.
      state = restore(mngr, program, c, data)
      if state is None:
        state = init_from(program, c.train.init_from) if c.train.init_from else init_state(program)
        logging.info("new run in %s (%d parameters)", workdir,
                     sum(int(p.size) for p in jax.tree.leaves(state.params)))
      start = int(jax.device_get(state.step))
      runtime.sync_processes("initialised")
      if start:
        logging.info("resumed %s at step %d", workdir, start)
      # 5. Loop: step, log, validate, save.
      writer = open_writer(workdir, c.log, start, jax.process_index() == 0, ckpt.plain(c))
      pbar = tqdm(total=int(c.train.num_steps), initial=start, dynamic_ncols=True,
                  disable=jax.process_index() != 0, desc="train")
      acc: dict[str, list[float]] = {}
      busy, n_timed = 0.0, 0  # seconds in data + step (validation and checkpoints excluded)
      try:
        for step in range(start, num_steps):
          t0 = time.perf_counter()
          state, m = program.step(state, global_batch(program, next(data)))
          m = jax.device_get(m)
          busy, n_timed = busy + time.perf_counter() - t0, n_timed + 1
          _check_finite(m, step + 1, mngr)  # steps count from 1 in logs and checkpoints
          m["kbps"] = 0.0 if m["pretrain"] else float(program.model.kbps(int(m["num_streams"])))
          for k, v in m.items():
            acc.setdefault(k, []).append(float(v))
          n = step + 1
          pbar.update(1)
          if n % int(c.log.every_steps) == 0 or n == num_steps:
            row = {k: float(np.mean(v)) for k, v in acc.items()}
            row["steps_per_sec"] = n_timed / max(busy, 1e-9)
            writer.write(n, row)
            adv = {k: f"{row[f'{k}_loss']:.3f}" for k in ("gen", "feat", "disc") if f"{k}_loss" in row}
            pbar.set_postfix(loss=f"{row['loss']:.4f}", **adv, kbps=f"{row['kbps']:.1f}",
                             steps_s=f"{row['steps_per_sec']:.2f}", refresh=False)
            acc, busy, n_timed = {}, 0.0, 0
          val = None
          if clips and n > int(c.train.pretrain_steps) and (n % val_every == 0 or n == int(c.train.num_steps)):
            val = validate(program, c, state, clips)
            writer.write(n, val, prefix="val")
            logging.info("step %d validation at %d streams: %s", n, c.eval.num_streams,
                         " ".join(f"{k}={v:.4f}" for k, v in val.items()))
          if n % int(c.ckpt.every_steps) == 0 or n == num_steps or val is not None:
            save(mngr, state, c, data, val)
      finally:
        pbar.close()
        writer.close()
    finally:
      if data is not None and hasattr(data, "close"):
        data.close()
  return state
