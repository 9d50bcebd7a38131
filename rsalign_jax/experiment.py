"""What a config builds before any step runs: tokenizer, model, objective, optimizer and the train state's shapes.

`build_setup(config, workdir, mesh)` returns a `Setup`, which the trainer, the modes that load a trained state
(`main --mode=eval|export|search`) and `rsalign_jax.load` share: training reads the training split once and saves in
the workdir what rebuilds the model without it; loading reads those files and opens the dataset only for a split.
Models and objectives are found by module path (`rsalign_jax.models.<model_name>`, `rsalign_jax.losses.<loss_name>`)
and keep the contracts written in `rsalign_jax/models/base.py` and `rsalign_jax/losses/base.py`; the batch fields
come from their declarations.
"""
import dataclasses
import functools
import os
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rsalign_jax import input_spec, optimizers
from rsalign_jax import trunk_cache as trunk_cache_lib
from rsalign_jax.data import pipeline, preprocessing, sources
from rsalign_jax.data import splits as splits_lib
from rsalign_jax.data.tokenizers import ClipBpeTokenizer, WordPieceTokenizer, WordVocab
from rsalign_jax.evaluation import evaluator as evaluator_lib
from rsalign_jax.losses import base as objective_base
from rsalign_jax.models import base as model_base
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import sharding as sharding_lib
from rsalign_jax.weights import clip as clip_weights
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
  """`text.tokenizer`: 'word' (the papers' vocabulary: `text.vocab_file`, else built from the train captions),
  'wordpiece' (BERT-style towers; `text.vocab_file` is a vocab.txt) or 'clip_bpe' (CLIP text towers; `text.vocab_file`
  is a file `data.tokenizers.ClipBpeTokenizer` reads, default the installed open-clip-torch's BPE merges).

  The tokenizer a workdir trained with is kept in it (`TOKENIZER_FILES`) and read from there first, so a
  workdir rebuilds its model alone (`train_captions=None`: no dataset at hand); a different `text.vocab_file` for
  a trained workdir is an error, not a silent switch.
  """
  kind = config.text.tokenizer
  if kind not in TOKENIZER_FILES:
    raise ValueError(f"text.tokenizer={kind!r}: expected one of {tuple(TOKENIZER_FILES)}")
  saved = os.path.join(workdir, TOKENIZER_FILES[kind]) if workdir else ""
  kept = bool(saved) and os.path.exists(saved)
  vocab_file = config.text.get("vocab_file")
  if kind == "wordpiece" and not (vocab_file or kept):
    raise ValueError("text.tokenizer='wordpiece' needs text.vocab_file: a BERT/MiniLM vocab.txt")
  if kind == "wordpiece":
    tokenizer = WordPieceTokenizer(saved if kept else vocab_file)
  elif kind == "clip_bpe":
    tokenizer = ClipBpeTokenizer(saved if kept else vocab_file or clip_weights.packaged_bpe())
  elif kept:
    tokenizer = WordVocab.load(saved)
  elif vocab_file:
    tokenizer = WordVocab.load(vocab_file, config.text.stopwords)
  elif train_captions is None:
    raise FileNotFoundError(f"{saved}: no vocabulary saved in the workdir (trained before workdirs kept it); "
                            "rebuild it from the dataset: pass the run's --config with its dataset present")
  else:
    tokenizer = WordVocab.build(train_captions, min_count=config.text.min_count, stopwords=config.text.stopwords)
  if kept:
    _check_same_vocabulary(tokenizer, vocab_file, kind, saved)
  elif saved and jax.process_index() == 0:
    tokenizer.save(saved)
  return tokenizer


TOKENIZER_FILES = {"word": "vocab.json", "wordpiece": "vocab.txt", "clip_bpe": "clip_bpe.json"}
TOKENIZER_LOADERS = {"word": WordVocab.load, "wordpiece": WordPieceTokenizer, "clip_bpe": ClipBpeTokenizer}


def _check_same_vocabulary(tokenizer, vocab_file, kind, saved):
  if not vocab_file or not os.path.exists(vocab_file):
    return
  given = TOKENIZER_LOADERS[kind](vocab_file)
  if given.vocabulary() != tokenizer.vocabulary():
    raise ValueError(f"text.vocab_file={vocab_file}: differs from the vocabulary this workdir trained with "
                     f"({saved}); use a new --workdir for a new vocabulary")


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
  from `rng` as `create_train_state` does. Entries filling the objective's parameters are not the model's: skipped."""
  args, fields = model_inputs(model, example)
  variables = jax.jit(lambda r: model.init(_init_rngs(r)[0], *args, **fields, train=False))(rng)
  init = {name: entry for name, entry in dict(config.get("init") or {}).items()
          if not entry.get("into", "").startswith("params/objective")}
  variables = weights_common.init_params({"params": {"model": variables["params"]},
                                          "batch_stats": variables.get("batch_stats", {})}, init)
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
  train_data: tuple | None = None  # (records, CaptionIndex) of the training split, read on first use
  evaluators: dict = dataclasses.field(default_factory=dict)  # split name -> RetrievalEvaluator, built on first use

  @property
  def train_source(self):
    return self._train_data()[0]

  @property
  def train_index(self):
    return self._train_data()[1]

  def _train_data(self):
    if self.train_data is None:
      self.train_data = read_train_split(self.config)
    return self.train_data

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
    """Split `split`'s `RetrievalEvaluator`, built on first use and kept: a run's evaluators of one split share it
    (and the decoded images it keeps)."""
    if split not in self.evaluators:
      views = eval_views(self.config)
      pp = self.pp_eval
      if views > 1 and self._cached("image"):
        cached = self.config.trunk_cache.views
        if split == self.config.dataset.train_split and views > cached:
          raise ValueError(f"eval_views={views} exceeds trunk_cache.views={cached}: the training split's cached "
                           f"images (e.g. a query bank's) hold {cached} views each")
        pp = f"views({views})"
      elif views > 1:
        pp = f"{pp}|dihedral_views({views})"
      self.evaluators[split] = evaluator_lib.RetrievalEvaluator(self.split(split), pp_spec=pp, views=views,
                                                                batch_size=self.config.eval_batch_size,
                                                                mesh=self.mesh)
    return self.evaluators[split]

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


def eval_views(config):
  """`config.eval_views` (1 in configs saved before it existed), checked."""
  views = config.get("eval_views", 1)
  if not 1 <= views <= preprocessing.DIHEDRAL_VIEWS:
    raise ValueError(f"eval_views={views}: expected 1..{preprocessing.DIHEDRAL_VIEWS} dihedral views of each "
                     "evaluated image (1: the image alone)")
  return views


def read_train_split(config):
  """(records, CaptionIndex) of the training split."""
  source = sources.open_split(config.dataset, config.dataset.train_split)
  return source, sources.CaptionIndex.read(source)


def build_setup(config, workdir, mesh, *, training=True):
  """Builds the tokenizer, model, objective, optimizer and the (abstract, sharded) train state. Nothing is
  initialised or trained.

  training: reads the training split (its captions build the vocabulary, its first record gives the input shapes)
  and saves in `workdir` what rebuilds the model without it (the tokenizer, `input_spec.InputSpec`, the frozen
  trunks of a trunk cache); otherwise those saved files are read and the dataset is opened only if a split is
  asked for (`Setup.split`), so a copied workdir embeds texts and image files alone.
  """
  views = eval_views(config)
  spec = None if training else input_spec.InputSpec.load(workdir)
  train_data = None if spec else read_train_split(config)
  vocab = load_tokenizer(config, train_data[1].captions if train_data else None, workdir)
  model = build_model(config, vocab.size)
  objective = build_objective(config, vocab)
  if spec is None:
    num_items = _num_items(config, train_data[1])
    if num_items < config.input.batch_size:
      raise ValueError(f"input.batch_size={config.input.batch_size} exceeds the {num_items} training items")
    spec = input_spec.InputSpec.describe(config, train_data[0], train_data[1].captions, vocab,
                                         batch_fields(config, model, objective), num_items // config.input.batch_size)
    if training and jax.process_index() == 0:
      spec.save(workdir)
  schedule = optimizers.make_schedule(config, spec.steps_per_epoch)
  example = spec.example_batch(config.text.max_len)
  cache = None
  if trunk_cache_lib.enabled(config):
    full_model, full_example = model, example
    model = build_model(config, vocab.size, precomputed=trunk_cache_lib.cached_towers(config))
    cache = trunk_cache_lib.TrunkCache(config, full_model, functools.partial(
        _trunk_variables, full_model, config, full_example, workdir), vocab, eval_views=views)
    if training:
      cache.variables()  # computed (and saved in the workdir) now, so the workdir embeds new inputs alone
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
  return Setup(config=config, mesh=mesh, vocab=vocab, model=model, objective=objective, schedule=schedule, tx=tx,
               steps_per_epoch=spec.steps_per_epoch, init_fn=init_fn, abstract_state=abstract_state,
               state_sharding=state_sharding, retrieval=evaluator_lib.Retrieval(model, mesh), trunk_cache=cache,
               train_data=train_data)


TRUNK_VARIABLES = "trunk_variables.msgpack"


def _trunk_variables(full_model, config, example, workdir):
  """The frozen trunks' variables: WORKDIR/trunk_variables.msgpack, else `config.init`'s pretrained weights
  (`pretrained_model_variables`), then saved there."""
  path = os.path.join(workdir, TRUNK_VARIABLES)
  if os.path.exists(path):
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  variables = jax.device_get(pretrained_model_variables(full_model, config, example, jax.random.key(config.seed)))
  if jax.process_index() == 0:
    with open(f"{path}.tmp", "wb") as f:
      f.write(flax.serialization.msgpack_serialize(variables))
    os.replace(f"{path}.tmp", path)
  return variables


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


def _num_items(config, index):
  return len(index.captions) if config.input.sampling == "per_caption" else index.num_images

