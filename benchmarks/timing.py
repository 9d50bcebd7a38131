"""Shared by the benchmark scripts: load a method config and time its jitted train step on random inputs.

The batch is random images and tokens plus every per-image field the model and the objective declare
(`experiment.batch_fields`), computed by `rsalign_jax.data.fields` from real records of the config's training split
(so labels and metadata are realistic; only configs with fields need the dataset).
"""
import functools
import pathlib
import time

import jax
import numpy as np

from rsalign_jax import configlib, experiment, optimizers, train
from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import sources
from rsalign_jax.runtime import sharding as sharding_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
_VOCAB = 250


def load_config(name, arg=None):
  """`configs/<name>.py`'s get_config(arg)."""
  return configlib.load_module(CONFIGS / f"{name}.py").get_config(arg)


def time_train_step(config, image_size, steps=5):
  """{compile_s, s_per_step, images_per_s, temp_mib, fields} of `config`'s jitted step at its global batch size.

  temp_mib is XLA's per-device temporary memory of the compiled step (`memory_analysis().temp_size_in_bytes`).
  """
  mesh = sharding_lib.make_mesh()
  batch_size = config.input.batch_size
  rng = np.random.default_rng(0)
  vocab_size = vocabulary_size(config)
  model, objective = experiment.build_model(config, vocab_size), experiment.build_objective(config)
  batch = {"image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
           "tokens": rng.integers(1, vocab_size, size=(batch_size, config.text.max_len)).astype(np.int32),
           "lengths": rng.integers(8, 16, size=(batch_size,)).astype(np.int32),
           "image_id": np.arange(batch_size, dtype=np.int32),
           **field_values(config, model, objective, batch_size, vocab_size, rng)}
  batch = sharding_lib.to_global(batch, sharding_lib.batch_sharding(mesh))
  schedule = optimizers.make_schedule(config, steps_per_epoch=100)
  tx = optimizers.make_optimizer(config, schedule)
  with jax.set_mesh(mesh):
    state = jax.jit(functools.partial(experiment.create_train_state, model=model, objective=objective, tx=tx,
                                      example=jax.tree.map(lambda x: x[:16], batch)),
                    out_shardings=sharding_lib.replicated(mesh))(jax.random.key(0))
    start = time.time()
    step = jax.jit(functools.partial(train.train_step, model=model, objective=objective, tx=tx, schedule=schedule,
                                     dropout_key=jax.random.key(1),
                                     grad_cache_chunk=config.get("grad_cache_chunk", 0),
                                     frozen=optimizers.frozen_patterns(config))).lower(state, batch).compile()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.time() - start
    start = time.time()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  seconds = (time.time() - start) / steps
  return {"compile_s": compile_seconds, "s_per_step": seconds, "images_per_s": batch_size / seconds,
          "temp_mib": step.memory_analysis().temp_size_in_bytes / 2**20,
          "fields": tuple(sorted(set(batch) - {"image", "tokens", "lengths", "image_id"}))}


def vocabulary_size(config):
  """The WordPiece vocabulary's size for BERT-style text towers (pretrained embeddings), else a small word vocab."""
  if config.text.tokenizer == "wordpiece":
    return experiment.load_tokenizer(config, [], workdir="").size
  return _VOCAB


def field_values(config, model, objective, batch_size, vocab_size, rng):
  """{name: (batch_size, ...)} of every field of the batch, from the first records of the training split (cycled)
  with random caption tokens."""
  names = experiment.batch_fields(config, model, objective)
  if not names:
    return {}
  source = sources.open_split(config.dataset, config.dataset.train_split)
  values = {name: [] for name in names}
  for row in range(batch_size):
    record = source[row % len(source)]
    image_tokens = rng.integers(1, vocab_size, size=(fields_lib.CAPTION_SET_SIZE, config.text.max_len))
    for name in names:
      values[name].append(np.asarray(fields_lib.get(name)(record, image_tokens.astype(np.int32))))
  return {name: np.stack(v) for name, v in values.items()}
