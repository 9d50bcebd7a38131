"""What a config builds before any step runs: tokenizer, model, objective, optimizer and the train state's shapes.

`build_setup(config, workdir, mesh)` reads the training split once and returns a `Setup`, which the trainer and the
modes that load a trained state (`main --mode=eval|export|search`) share. Models and objectives are found by module
path (`rsalign_jax.models.<model_name>`, `rsalign_jax.losses.<loss_name>`) and keep the contracts written in
`rsalign_jax/models/base.py` and `rsalign_jax/losses/base.py`; the batch fields come from their declarations.
"""
import dataclasses
import functools
import os
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rsalign_jax import optimizers
from rsalign_jax import trunk_cache as trunk_cache_lib
from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import pipeline, preprocessing, sources
from rsalign_jax.data import splits as splits_lib
from rsalign_jax.data.tokenizers import WordPieceTokenizer, WordVocab
from rsalign_jax.evaluation import evaluator as evaluator_lib
from rsalign_jax.losses import base as objective_base
from rsalign_jax.models import base as model_base
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import sharding as sharding_lib
from rsalign_jax.weights import common as weights_common

log = metric_writer.log


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the step, model and objective parameters, BatchNorm statistics, optimizer state."""
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
  kwargs = {**config.model.to_dict(), **overrides}
  return model_base.model_class(config.model_name)(**kwargs, vocab_size=vocab_size, dtype=jnp.dtype(compute_dtype))


def build_objective(config, tokenizer=None):
  """`config.loss_name` -> `rsalign_jax.losses.<name>.Objective.from_config(config.loss, tokenizer)`."""
  return objective_base.objective_class(config.loss_name).from_config(config.loss.to_dict(), tokenizer)


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


def batch_fields(config, model, objective):
  """The per-image fields every train batch carries: the model's and the objective's declarations."""
  if "fields" in config.input:
    raise ValueError("input.fields: no longer read; a batch carries the fields the model declares (IMAGE_FIELDS, "
                     "TEXT_FIELDS) and the objective declares (batch_fields); remove input.fields from the config")
  return tuple(sorted(set(model_base.fields(model)) | set(objective.batch_fields)))


def model_inputs(model, batch):
  """The positional inputs and field keywords of `model(...)` for a batch."""
  return (batch["image"], batch["tokens"], batch["lengths"]), {name: batch[name] for name in model_base.fields(model)}


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
  """The model's variables in a train state, as `model.apply` takes them."""
  return {"params": state.params["model"], "batch_stats": state.batch_stats}


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
  retrieval: evaluator_lib.Retrieval
  trunk_cache: trunk_cache_lib.TrunkCache | None = None  # frozen trunks' outputs, when the model reads those
  splits: dict = dataclasses.field(default_factory=dict)  # name -> splits.Split, read on first use

  @property
  def frozen(self):
    """The optimizer's frozen patterns; none on heads over cached trunks (the patterns named the trunks)."""
    return () if self.trunk_cache else optimizers.frozen_patterns(self.config)

  def model_records(self, split, source):
    """`split`'s records `source` with `image` as the model reads it: encoded pixels, or cached image-trunk outputs."""
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

  def split(self, name):
    """Split `name` (`data.splits.Split`), read and tokenised on first use and kept: the evaluator, the gallery
    pictures, export and search share it."""
    if name not in self.splits:
      train = name == self.config.dataset.train_split
      source = self.train_source if train else sources.open_split(self.config.dataset, name)
      self.splits[name] = splits_lib.read(name, source, self.model_records(name, source),
                                          self.text_encoder(name, source), self.config.text.max_len,
                                          self.model.IMAGE_FIELDS, self.model.TEXT_FIELDS)
    return self.splits[name]

  def make_evaluator(self, split):
    return evaluator_lib.RetrievalEvaluator(self.split(split), pp_spec=self.pp_eval,
                                            batch_size=self.config.eval_batch_size, mesh=self.mesh)

  def initial_state(self, rng):
    """A fresh sharded train state from `rng`, with `config.init`'s pretrained weights (`load_pretrained`)."""
    state = jax.jit(self.init_fn, out_shardings=self.state_sharding)(rng)
    return load_pretrained(state, self.config, cached_trunks=self.trunk_cache is not None)

  def train_items(self):
    """The training split as the loader samples it (`pipeline.TrainItems`): records and captions as the model reads
    them (token ids, or cached trunk outputs) with the batch fields."""
    config, index, name = self.config, self.train_index, self.config.dataset.train_split
    if self.trunk_cache:
      log("training on cached outputs of the frozen %s trunk(s) (trunk_cache.views=%d; input.pp_train unused)",
          "+".join(self.trunk_cache.towers), config.trunk_cache.views)
    tokens, lengths, truncated = self.text_encoder(name, self.train_source).encode_batch(index.captions,
                                                                                       config.text.max_len)
    log("train: %d images, %d captions; vocabulary of %d tokens; %d captions truncated to %d tokens",
        index.num_images, len(index.captions), self.vocab.size - 1, truncated, config.text.max_len)
    return pipeline.TrainItems(
        self.model_records(name, self.train_source), index, tokens, lengths, sampling=config.input.sampling,
        global_batch_size=config.input.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed, name=config.dataset.name,
        fields=batch_fields(config, self.model, self.objective))


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
  objective = build_objective(config, vocab)
  schedule = optimizers.make_schedule(config, steps_per_epoch)
  example = _example_batch(config, train_source, train_index, vocab, batch_fields(config, model, objective))
  cache = None
  if trunk_cache_lib.enabled(config):
    full_model, full_example = model, example
    model = build_model(config, vocab.size, precomputed=trunk_cache_lib.cached_towers(config))
    cache = trunk_cache_lib.TrunkCache(config, full_model, lambda: pretrained_model_variables(
        full_model, config, full_example, jax.random.key(config.seed)), vocab)
    example = {**example, **_trunk_example(full_model, full_example, cache.towers)}
  # On cached trunks optimizer.frozen named the trunks: the heads are all trained (checked below).
  tx = optimizers.make_optimizer(config, schedule, frozen=() if cache else None)
  if config.get("grad_cache_chunk") and model.PAIRWISE:
    raise ValueError(f"grad_cache_chunk={config.grad_cache_chunk}: model {config.model_name!r} is PAIRWISE (its "
                     "outputs couple a batch's examples, e.g. a (B, B) score matrix), so it cannot be embedded chunk "
                     "by chunk; set grad_cache_chunk=0")
  init_fn = functools.partial(create_train_state, model=model, objective=objective, tx=tx, example=example)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed))
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, patterns=config.sharding.fsdp_params,
                                                min_size=config.sharding.fsdp_min_size)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)
  if cache is not None:
    _check_heads_trained(abstract_state.params, optimizers.frozen_patterns(config))
  return Setup(config, mesh, train_source, train_index, vocab, model, objective, schedule, tx, steps_per_epoch,
               init_fn, abstract_state, state_sharding, evaluator_lib.Retrieval(model, mesh), cache)


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


def _example_batch(config, train_source, train_index, vocab, field_names, rows=16):
  """Zero inputs shaped like a train batch, for initialisation (shapes only; enough rows for strided sub-batches
  inside objectives)."""
  example_image = preprocessing.parse(config.input.pp_eval)(train_source[0]["image"], np.random.default_rng(0))
  example = {"image": jnp.zeros((rows,) + example_image.shape, jnp.float32),
             "tokens": jnp.ones((rows, config.text.max_len), jnp.int32),
             "lengths": jnp.full((rows,), config.text.max_len, jnp.int32),
             "image_id": jnp.arange(rows, dtype=jnp.int32)}
  tokens, _, _ = vocab.encode_batch(train_index.captions[:1] * 5, config.text.max_len)
  for name in field_names:
    value = np.asarray(fields_lib.get(name)(train_source[0], tokens))
    example[name] = jnp.zeros((rows,) + value.shape, value.dtype)
  return example


def _num_items(config, index):
  return len(index.captions) if config.input.sampling == "per_caption" else index.num_images

