"""The one trainer: methods differ by config, model module (`config.model_name`) and objective (`config.loss_name`).

`train_and_evaluate(config, workdir)` trains with the global batch sharded over a ('data',) mesh, evaluates on the
validation split every `eval_every_epochs`, keeps the best-by-val-rsum state, resumes automatically from the newest
checkpoint in `workdir`, and ends with the test evaluation written to `workdir/results.json`. On a preemption notice
(SIGTERM) it finishes the current step, checkpoints it and returns early; re-running the same command resumes.
"""
import dataclasses
import functools
import importlib
import json
import os
import re
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rsalign_jax import gradcache, optimizers
from rsalign_jax import trunk_cache as trunk_cache_lib
from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import pipeline, preprocessing, sources
from rsalign_jax.data.tokenizers import WordPieceTokenizer, WordVocab
from rsalign_jax.evaluation import evaluator as evaluator_lib
from rsalign_jax.evaluation import gallery
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.runtime import checkpointing, metric_writer, preemption
from rsalign_jax.weights import common as weights_common
from rsalign_jax.runtime import sharding as sharding_lib

log = metric_writer.log


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # {"model": ..., "objective": ...}: the objective may hold learned parts (loss weights, temperature)
  batch_stats: dict
  opt_state: optax.OptState


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def build_model(config, vocab_size, **overrides):
  """`config.model_name` -> `rsalign_jax.models.<name>.Model(**config.model, vocab_size=..., dtype=compute dtype)`,
  with `overrides` replacing model fields (e.g. `precomputed`)."""
  compute_dtype = config.get("compute_dtype", "float32")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
  module = importlib.import_module(f"rsalign_jax.models.{config.model_name}")
  kwargs = {**config.model.to_dict(), **overrides}
  return module.Model(**kwargs, vocab_size=vocab_size, dtype=jnp.dtype(compute_dtype))


def build_objective(config):
  """`config.loss_name` -> `rsalign_jax.losses.<name>.Objective(**config.loss)`."""
  return importlib.import_module(f"rsalign_jax.losses.{config.loss_name}").Objective(**config.loss.to_dict())


def load_tokenizer(config, train_captions, workdir):
  """`text.tokenizer`: 'word' (the papers' vocabulary: `text.vocab_file`, else the one saved in workdir, else built
  from the train captions and saved) or 'wordpiece' (BERT-style towers; `text.vocab_file` is a vocab.txt)."""
  kind = config.text.tokenizer
  if kind == "wordpiece":
    if not config.text.get("vocab_file"):
      raise ValueError("text.tokenizer='wordpiece' needs text.vocab_file: a BERT/MiniLM vocab.txt")
    return WordPieceTokenizer(config.text.vocab_file)
  if kind != "word":
    raise ValueError(f"text.tokenizer={kind!r}: expected 'word' or 'wordpiece'")
  if config.text.get("vocab_file"):
    return WordVocab.load(config.text.vocab_file, config.text.stopwords)
  path = os.path.join(workdir, "vocab.json")
  if os.path.exists(path):
    return WordVocab.load(path)
  vocab = WordVocab.build(train_captions, min_count=config.text.min_count, stopwords=config.text.stopwords)
  if jax.process_index() == 0:
    vocab.save(path)
  return vocab


def model_fields(model):
  """The per-image fields (`rsalign_jax.data.fields`) a model's towers take: its IMAGE_FIELDS and TEXT_FIELDS."""
  return tuple(getattr(model, "IMAGE_FIELDS", ())) + tuple(getattr(model, "TEXT_FIELDS", ()))


def model_inputs(model, batch):
  """The positional inputs and field keywords of `model(...)` for a batch."""
  return (batch["image"], batch["tokens"], batch["lengths"]), {name: batch[name] for name in model_fields(model)}


def create_train_state(rng, model, objective, tx, example):
  """Initialises params, BN statistics and optimizer state from an example batch (only its shapes matter)."""
  model_rngs, objective_rng = _init_rngs(rng)
  args, fields = model_inputs(model, example)
  variables = model.init(model_rngs, *args, **fields, train=False)
  outputs = model.apply(variables, *args, **fields, train=False)
  objective_params = objective.init(objective_rng, outputs, example).get("params", {})
  params = {"model": variables["params"], "objective": objective_params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def _init_rngs(rng):
  """The model's init rngs and the objective's, from the run's rng."""
  model_rng, objective_rng, dropout_rng = jax.random.split(rng, 3)
  return {"params": model_rng, "dropout": dropout_rng}, objective_rng


def train_step(state, batch, *, model, objective, tx, schedule, dropout_key, grad_cache_chunk=0, frozen=()):
  """One update on a global batch; returns the new state and float32 scalar metrics.

  frozen: the optimizer's `frozen` regexes; autodiff skips those parameters (their gradients are zero).

  grad_cache_chunk > 0: the same full-batch gradient by gradient caching (`rsalign_jax.gradcache`), embedding the
  batch in chunks of that many examples (BatchNorm then normalises per chunk, as it does per device).
  """
  rng = jax.random.fold_in(dropout_key, state.step)
  is_frozen = optimizers.frozen_mask(state.params, frozen)

  def embed(model_params, examples, rng):
    model_params = optimizers.stop_frozen_gradients(model_params, is_frozen["model"])
    args, fields = model_inputs(model, examples)
    outputs, updates = model.apply({"params": model_params, "batch_stats": state.batch_stats}, *args, **fields,
                                   train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return outputs, updates.get("batch_stats", {})

  def objective_loss(objective_params, outputs, batch):
    objective_params = optimizers.stop_frozen_gradients(objective_params, is_frozen["objective"])
    return objective.apply({"params": objective_params}, outputs, batch)

  if grad_cache_chunk:
    (loss, (aux, batch_stats)), grads = gradcache.gradcache_value_and_grad(
        embed, objective_loss, state.params, batch, chunk_size=grad_cache_chunk, rng=rng)
  else:
    def loss_fn(params):
      outputs, batch_stats = embed(params["model"], batch, rng)
      loss, aux = objective_loss(params["objective"], outputs, batch)
      return loss, (aux, batch_stats)

    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **aux, "l2_grads": optax.tree.norm(grads), "l2_params": optax.tree.norm(params),
             "l2_updates": optax.tree.norm(updates), "lr": schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def load_pretrained(state, config, *, cached_trunks=False):
  """The initial state with the parameters and BatchNorm statistics named in `config.init` replaced by imported
  checkpoints (`rsalign_jax.weights.common.init_params`: each entry has a format, a checkpoint path and the
  '/'-path of the subtree it fills, e.g. 'params/model/image_tower'). Adam's moments start at zero either way.
  cached_trunks: the state is a model's heads on cached trunk outputs; entries filling subtrees it does not have
  are the trunks' (`pretrained_model_variables` applied them when the cache was computed)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  init = dict(config.get("init") or {})
  if cached_trunks:
    paths = weights_common.flatten(variables)
    init = {name: entry for name, entry in init.items()
            if not entry.get("into") or any(path.startswith(f"{entry['into']}/") for path in paths)}
  if not init:
    return state
  variables = weights_common.init_params(variables, init)
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def pretrained_model_variables(model, config, example, rng):
  """The model's variables with `config.init`'s pretrained weights (what its frozen trunks compute with), initialised
  from `rng` as `create_train_state` does."""
  args, fields = model_inputs(model, example)
  variables = jax.jit(lambda r: model.init(_init_rngs(r)[0], *args, **fields, train=False))(rng)
  variables = weights_common.init_params({"params": {"model": variables["params"]},
                                          "batch_stats": variables.get("batch_stats", {})}, config.get("init"))
  return {"params": variables["params"]["model"], "batch_stats": variables["batch_stats"]}


def model_variables(state):
  return {"params": state.params["model"], "batch_stats": state.batch_stats}


class _Retrieval:
  """Jitted embedding/scoring functions of a model, shared by every evaluator."""

  def __init__(self, model, mesh):
    replicated = sharding_lib.replicated(mesh)
    self.embed_images = jax.jit(
        lambda v, images, fields: model.apply(v, images, **fields, train=False, method="embed_images"),
        out_shardings=replicated)
    self.embed_texts = jax.jit(
        lambda v, tokens, lengths, fields: model.apply(v, tokens, lengths, **fields, train=False,
                                                       method="embed_texts"),
        out_shardings=replicated)
    self.score = jax.jit(lambda v, images, texts: model.apply(v, images, texts, method="score"))

  def evaluate(self, evaluator, state):
    return evaluator.run(model_variables(state), self.embed_images, self.embed_texts, self.score)


# The loss and gradients of a step and the parameters it produced (a NaN learning rate spoils only the last).
_WATCHED = ("loss", "l2_grads", "l2_params")


@jax.jit
def _first_non_finite(first, step, metrics):
  """`first` after `step`: the first step whose watched metrics were not all finite (0: none yet), and those metrics.

  Kept on the device, so the loop checks every step but fetches to the host only at the steps that need it.
  """
  watched = {k: metrics[k] for k in _WATCHED}
  now = (first["step"] == 0) & ~jnp.all(jnp.isfinite(jnp.stack(list(watched.values()))))
  return jax.tree.map(lambda kept, new: jnp.where(now, new, kept), first, {"step": step, **watched})


def _check_finite(first):
  """Raises if a step was non-finite; `first` is `_first_non_finite`'s, fetched to the host."""
  if first["step"]:
    bad = ", ".join(f"{k}={first[k]}" for k in _WATCHED if not np.isfinite(first[k]))
    raise FloatingPointError(
        f"step {first['step']}: non-finite {bad}; stopping before any checkpoint of this or a later state is written. "
        "Lower optimizer.lr, set optimizer.grad_clip_norm, or check the input data.")


def _format_duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the results dict."""
  mesh = sharding_lib.make_mesh(fsdp=config.sharding.fsdp)
  with jax.set_mesh(mesh):  # sharded losses (`loss.impl`) take the mesh from this context
    return _train_and_evaluate(config, os.path.abspath(workdir), mesh)  # orbax needs absolute paths


@dataclasses.dataclass
class Setup:
  """What a config builds before any step runs: training data, tokenizer, model, objective, optimizer, state shapes.

  Shared by training and the modes that only load a trained state (`main --mode=eval|export|search`).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_source: object
  train_index: sources.CaptionIndex
  vocab: object
  model: flax.linen.Module
  objective: flax.linen.Module
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  steps_per_epoch: int
  init_fn: functools.partial  # rng -> TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
  state_sharding: TrainState
  retrieval: "_Retrieval"
  trunk_cache: trunk_cache_lib.TrunkCache | None = None  # frozen trunks' outputs, when the model reads those

  @property
  def frozen(self):
    """The optimizer's frozen patterns; none on heads over cached trunks (the patterns named the trunks)."""
    return () if self.trunk_cache else optimizers.frozen_patterns(self.config)

  def open_split(self, split, source=None):
    """`split`'s records with `image` as the model reads it: encoded pixels, or cached image-trunk outputs."""
    source = sources.open_split(self.config.dataset, split) if source is None else source
    return self.trunk_cache.images(split, source) if self.trunk_cache else source

  def text_encoder(self, split, source):
    """What turns the captions of `split` (records `source`) into the model's text inputs: the tokenizer, or the
    cached text-trunk outputs (`split=None`: free text, computed on demand)."""
    return self.trunk_cache.texts(split, source) if self.trunk_cache else self.vocab

  @property
  def pp_train(self):
    return trunk_cache_lib.TRAIN_PP if self._cached("image") else self.config.input.pp_train

  @property
  def pp_eval(self):
    return trunk_cache_lib.EVAL_PP if self._cached("image") else self.config.input.pp_eval

  def _cached(self, tower):
    return self.trunk_cache is not None and tower in self.trunk_cache.towers

  def make_evaluator(self, split):
    config = self.config
    source = sources.open_split(config.dataset, split)
    return evaluator_lib.RetrievalEvaluator(
        self.open_split(split, source), self.text_encoder(split, source), pp_spec=self.pp_eval,
        max_len=config.text.max_len, batch_size=config.eval_batch_size, mesh=self.mesh,
        image_fields=tuple(getattr(self.model, "IMAGE_FIELDS", ())),
        text_fields=tuple(getattr(self.model, "TEXT_FIELDS", ())))

  def batch_fields(self):
    """Fields every train batch carries: the objective's (`input.fields`) and the model's."""
    return tuple(sorted(set(self.config.input.get("fields", ())) | set(model_fields(self.model))))


def build_setup(config, workdir, mesh):
  """Reads the training split's captions, loads or builds the tokenizer, and builds the model, objective,
  optimizer and the (abstract, sharded) train state. Nothing is initialised or trained."""
  train_source = sources.open_split(config.dataset, config.dataset.train_split)
  train_index = sources.CaptionIndex.read(train_source)
  vocab = load_tokenizer(config, train_index.captions, workdir)
  steps_per_epoch = _num_items(config, train_index) // config.input.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"input.batch_size={config.input.batch_size} exceeds the {_num_items(config, train_index)} "
                     "training items")
  model = build_model(config, vocab.size)
  objective = build_objective(config)
  schedule = optimizers.make_schedule(config, steps_per_epoch)
  example = _example_batch(config, train_source, train_index, vocab, model)
  cache = None
  if trunk_cache_lib.enabled(config):
    full_model, full_example = model, example
    model = build_model(config, vocab.size, precomputed=trunk_cache_lib.cached_towers(config))
    cache = trunk_cache_lib.TrunkCache(config, full_model, lambda: pretrained_model_variables(
        full_model, config, full_example, jax.random.key(config.seed)), vocab)
    example = {**example, **_trunk_example(full_model, full_example, cache.towers)}
  # On cached trunks optimizer.frozen named the trunks: the heads are all trained (checked below).
  tx = optimizers.make_optimizer(config, schedule, frozen=() if cache else None)
  if config.get("grad_cache_chunk"):
    _check_per_example_outputs(model, example)
  init_fn = functools.partial(create_train_state, model=model, objective=objective, tx=tx, example=example)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed))
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, patterns=config.sharding.fsdp_params,
                                                min_size=config.sharding.fsdp_min_size)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)
  if cache is not None:
    _check_heads_trained(abstract_state.params, optimizers.frozen_patterns(config))
  return Setup(config, mesh, train_source, train_index, vocab, model, objective, schedule, tx, steps_per_epoch,
               init_fn, abstract_state, state_sharding, _Retrieval(model, mesh), cache)


def _check_heads_trained(params, patterns):
  """With cached trunks, `optimizer.frozen` may only name trunk parameters (which the heads model does not have)."""
  names = jax.tree.leaves(optimizers.parameter_paths(params))
  frozen_heads = sorted(name for name in names if any(re.fullmatch(p, name) for p in patterns))
  if frozen_heads:
    raise ValueError(f"trunk_cache.views > 0 trains every head parameter, but optimizer.frozen matches "
                     f"{frozen_heads[:5]}; freeze whole towers (model.frozen) or set trunk_cache.views=0")


def _trunk_example(full_model, example, towers):
  """Zero inputs shaped like a batch of the trunk outputs of `towers` ('image' and/or 'text'), for the heads."""
  args, fields = model_inputs(full_model, example)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  variables = jax.eval_shape(lambda: full_model.init(rngs, *args, **fields, train=False))
  trunk_example = {}
  if "image" in towers:
    out = jax.eval_shape(lambda v: full_model.apply(v, example["image"], method="image_trunk"), variables)
    trunk_example["image"] = jnp.zeros(out.shape, jnp.float32)
  if "text" in towers:
    out = jax.eval_shape(lambda v: full_model.apply(v, example["tokens"], example["lengths"], method="text_trunk"),
                         variables)
    trunk_example.update(tokens=jnp.zeros(out.shape, jnp.float32), lengths=jnp.ones(out.shape[:1], jnp.int32))
  return trunk_example


def _example_batch(config, train_source, train_index, vocab, model, rows=16):
  """Zero inputs shaped like a train batch, for initialisation (shapes only; enough rows for strided sub-batches
  inside objectives)."""
  example_image = preprocessing.parse(config.input.pp_eval)(train_source[0]["image"], np.random.default_rng(0))
  example = {"image": jnp.zeros((rows,) + example_image.shape, jnp.float32),
             "tokens": jnp.ones((rows, config.text.max_len), jnp.int32),
             "lengths": jnp.full((rows,), config.text.max_len, jnp.int32),
             "image_id": jnp.arange(rows, dtype=jnp.int32)}
  tokens, _, _ = vocab.encode_batch(train_index.captions[:1] * 5, config.text.max_len)
  for name in sorted(set(config.input.get("fields", ())) | set(model_fields(model))):
    value = np.asarray(fields_lib.get(name)(train_source[0], tokens))
    example[name] = jnp.zeros((rows,) + value.shape, value.dtype)
  return example


def _check_per_example_outputs(model, example):
  """Grad caching embeds the batch chunk by chunk, so every model output must be per example: (B, ...) with
  trailing dims independent of B. Pairwise outputs such as a (B, B) score matrix would silently become per-chunk."""
  def output_shapes(rows):
    args, fields = model_inputs(model, jax.tree.map(lambda x: x[:rows], example))
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    return jax.eval_shape(lambda: model.init_with_output(rngs, *args, **fields, train=False)[0])

  rows = len(example["image"])
  whole, half = output_shapes(rows), output_shapes(rows // 2)
  pairwise = [jax.tree_util.keystr(path) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole),
                                                                 jax.tree.leaves(half))
              if a.shape[:1] != (rows,) or b.shape != (rows // 2,) + a.shape[1:]]
  if pairwise:
    raise ValueError(f"grad_cache_chunk needs per-example model outputs, but {type(model).__module__} outputs "
                     f"{pairwise} are not (B, ...) per example (pairwise scores?); set grad_cache_chunk=0")


def _num_items(config, index):
  return len(index.captions) if config.input.sampling == "per_caption" else index.num_images


def _train_and_evaluate(config, workdir, mesh):
  os.makedirs(workdir, exist_ok=True)
  data_sharding = sharding_lib.batch_sharding(mesh)
  if config.input.batch_size % jax.device_count():
    raise ValueError(f"input.batch_size={config.input.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  writer = metric_writer.MetricWriter(workdir)
  log("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform, jax.process_count())

  setup = build_setup(config, workdir, mesh)
  train_index, vocab = setup.train_index, setup.vocab
  tokens, lengths, truncated = vocab.encode_batch(train_index.captions, config.text.max_len)
  log("train: %d images, %d captions; vocabulary of %d tokens; %d captions truncated to %d tokens",
      train_index.num_images, len(train_index.captions), vocab.size - 1, truncated, config.text.max_len)
  if setup.trunk_cache:
    log("training on cached outputs of the frozen %s trunk(s) (trunk_cache.views=%d; input.pp_train unused)",
        "+".join(setup.trunk_cache.towers), config.trunk_cache.views)
    tokens, lengths, _ = setup.text_encoder(config.dataset.train_split, setup.train_source).encode_batch(
        train_index.captions, config.text.max_len)
  items = pipeline.TrainItems(
      setup.open_split(config.dataset.train_split, setup.train_source), train_index, tokens, lengths,
      sampling=config.input.sampling,
      global_batch_size=config.input.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed, name=config.dataset.name, fields=setup.batch_fields())
  steps_per_epoch = setup.steps_per_epoch
  total_steps = config.get("total_steps") or config.total_epochs * steps_per_epoch
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  val_evaluator = setup.make_evaluator(config.dataset.val_split) if config.dataset.get("val_split") else None
  test_evaluator = setup.make_evaluator(config.dataset.test_split)

  rng = jax.random.key(config.seed)
  model, state_sharding, abstract_state, retrieval = (setup.model, setup.state_sharding, setup.abstract_state,
                                                      setup.retrieval)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, objective=setup.objective, tx=setup.tx, schedule=setup.schedule,
                        dropout_key=jax.random.fold_in(rng, 1), grad_cache_chunk=config.grad_cache_chunk,
                        frozen=setup.frozen),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,) if jax.devices()[0].platform != "cpu" else ())

  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  best_checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "best"), keep=1)
  loader_iterator = iter(pipeline.make_train_loader(items, pp_spec=setup.pp_train, seed=config.seed,
                                                    worker_count=config.input.worker_count))
  meta = {"best_val_rsum": -1.0, "best_step": None, "random_init_test": None}
  if checkpointer.latest_step() is not None:
    state, loader_state, meta = checkpointer.restore(abstract_state)
    loader_iterator.set_state(loader_state)
    writer.truncate_after(int(state.step))
    log("resumed from %s at step %d", workdir, int(state.step))
  else:
    state = load_pretrained(jax.jit(setup.init_fn, out_shardings=state_sharding)(rng), config,
                            cached_trunks=setup.trunk_cache is not None)
    if config.eval_random_init:
      meta["random_init_test"] = retrieval.evaluate(test_evaluator, state)
      log("random-init test: %s", _summary(meta["random_init_test"]))
  log("parameters: %s model, %s objective", f"{_count(state.params['model']):,}", _count(state.params["objective"]))

  # --- Train loop ------------------------------------------------------------------------------------------------
  prefetcher = sharding_lib.DevicePrefetcher(loader_iterator, data_sharding, size=config.input.prefetch)
  step = int(state.step)
  log("training steps %d..%d (%d steps/epoch, global batch %d)", step, total_steps, steps_per_epoch,
      config.input.batch_size)
  window_start, window_steps, train_start = time.time(), 0, time.time()
  preemption_watch = preemption.PreemptionWatch()
  preempted = False
  first_bad = jax.device_put({"step": np.int32(0), **{k: np.float32(0) for k in _WATCHED}},
                             sharding_lib.replicated(mesh))
  try:
    while step < total_steps:
      state, step_metrics = step_fn(state, next(prefetcher))
      first_bad = _first_non_finite(first_bad, state.step, step_metrics)
      step += 1
      window_steps += 1
      log_now = step % config.log_every_steps == 0 or step == total_steps
      val_now = val_evaluator is not None and (step % eval_every == 0 or step == total_steps)
      preempted = preemption_watch.reached(step)
      save_now = preempted or step % config.checkpoint_every_steps == 0 or step == total_steps
      if not (log_now or val_now or save_now):
        continue  # nothing needs this step on the host: dispatch the next one while the device runs it
      step_metrics, bad = jax.device_get((step_metrics, first_bad))  # waits for the step: time the window after it
      _check_finite(bad)
      if log_now:
        seconds_per_step = (time.time() - window_start) / window_steps
        writer.scalars(step, step_metrics, prefix="train/")
        writer.scalars(step, {"seconds_per_step": seconds_per_step,
                              "images_per_second": config.input.batch_size / seconds_per_step}, prefix="perf/")
        log("step %d/%d (epoch %.1f) loss %.4f | %.3f s/step, %.0f img/s | ETA %s", step, total_steps,
            step / steps_per_epoch, step_metrics["loss"], seconds_per_step,
            config.input.batch_size / seconds_per_step, _format_duration(seconds_per_step * (total_steps - step)))
        window_start, window_steps = time.time(), 0
      if val_now:
        val = retrieval.evaluate(val_evaluator, state)
        writer.scalars(step, val, prefix="val/")
        log("val @%d: %s", step, _summary(val))
        gallery.log_validation(writer, step, setup, model_variables(state))
        if val["rsum"] > meta["best_val_rsum"]:
          meta.update(best_val_rsum=val["rsum"], best_step=step, best_val=val)
          best_checkpointer.save(step, state, meta={"step": step, "val": val})
        window_start, window_steps = time.time(), 0
      if save_now:
        checkpointer.save(step, state, loader_state=prefetcher.state, meta=meta)
      if preempted:
        break
  finally:
    preemption_watch.close()
    prefetcher.close()
    checkpointer.wait_until_finished()
    best_checkpointer.wait_until_finished()
  train_seconds = time.time() - train_start
  if preempted:
    log("preempted: checkpoint saved at step %d; re-run the same command to resume", step)
    writer.close()
    checkpointer.close()
    best_checkpointer.close()
    return {"preempted_at_step": step}

  # --- Test ------------------------------------------------------------------------------------------------------
  tested = "last"
  if config.test_on_best and best_checkpointer.latest_step() is not None:
    state, _, _ = best_checkpointer.restore(abstract_state)
    tested = f"best val (step {int(state.step)})"
  test = retrieval.evaluate(test_evaluator, state)
  writer.scalars(step, test, prefix="test/")
  results = {"test": test, "tested_checkpoint": tested, "random_init_test": meta["random_init_test"],
             "best_val": meta.get("best_val"), "best_step": meta["best_step"], "total_steps": total_steps,
             "train_seconds_this_run": round(train_seconds, 1), "dataset": config.dataset.name,
             "test_images": test_evaluator.num_images, "model": config.model_name, "loss": config.loss_name}
  rows = {f"{config.model_name} ({tested})": test}
  if meta["random_init_test"] is not None:
    rows = {f"{config.model_name} (random init)": meta["random_init_test"], **rows}
  table = metrics_lib.format_table(rows, title=f"{config.dataset.name} {config.dataset.test_split}")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(table, flush=True)
  writer.text(step, "test/table", table)
  writer.close()
  checkpointer.close()
  best_checkpointer.close()
  return results


def _summary(metrics):
  return ", ".join(f"{k} {metrics[k]:.2f}" for k in ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "mR"))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))
