"""The shapes of a model's inputs, saved in the workdir so a trained model is rebuilt without its dataset.

Initialising a model (or the abstract train state a checkpoint restores into) needs an example batch: the image
shape after the eval preprocessing and the shape and dtype of every per-image field the model and objective
declare. Training reads them from the training split and writes `WORKDIR/inputs.json`; eval, export, search and
`rsalign_jax.load` read that file instead of opening the dataset.
"""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import preprocessing

FILENAME = "inputs.json"
EXAMPLE_ROWS = 16  # enough rows for the strided sub-batches some objectives take at initialisation


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """image_shape: (H, W, C) after `input.pp_eval`; fields: {name: (shape, dtype name)} per image;
  steps_per_epoch: of the training run (its learning-rate schedule)."""
  image_shape: tuple
  fields: dict
  steps_per_epoch: int

  @classmethod
  def describe(cls, config, train_source, train_captions, vocab, field_names, steps_per_epoch):
    """The spec of a training split's first record."""
    record = train_source[0]
    image = preprocessing.parse(config.input.pp_eval)(record["image"], np.random.default_rng(0))
    tokens, _, _ = vocab.encode_batch(train_captions[:1] * fields_lib.CAPTION_SET_SIZE, config.text.max_len)
    fields = {}
    for name in field_names:
      value = np.asarray(fields_lib.get(name)(record, tokens))
      fields[name] = (value.shape, value.dtype.name)
    return cls(tuple(image.shape), fields, steps_per_epoch)

  def example_batch(self, max_len, rows=EXAMPLE_ROWS):
    """Zero inputs shaped like a train batch (for initialisation: only the shapes matter)."""
    example = {"image": jnp.zeros((rows,) + self.image_shape, jnp.float32),
               "tokens": jnp.ones((rows, max_len), jnp.int32),
               "lengths": jnp.full((rows,), max_len, jnp.int32),
               "image_id": jnp.arange(rows, dtype=jnp.int32)}
    for name, (shape, dtype) in self.fields.items():
      example[name] = jnp.zeros((rows,) + tuple(shape), dtype)
    return example

  def save(self, workdir):
    path = os.path.join(workdir, FILENAME)
    with open(f"{path}.tmp", "w") as f:
      fields = {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in self.fields.items()}
      json.dump({"image_shape": list(self.image_shape), "fields": fields, "steps_per_epoch": self.steps_per_epoch},
                f, indent=2)
    os.replace(f"{path}.tmp", path)

  @classmethod
  def load(cls, workdir):
    """The workdir's spec, or None where it has none (trained before workdirs saved it)."""
    path = os.path.join(workdir, FILENAME)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      saved = json.load(f)
    try:
      return cls(tuple(saved["image_shape"]),
                 {name: (tuple(field["shape"]), field["dtype"]) for name, field in saved["fields"].items()},
                 int(saved["steps_per_epoch"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path}: expected image_shape, fields and steps_per_epoch as training writes them ({e!r})"
                       ) from None
