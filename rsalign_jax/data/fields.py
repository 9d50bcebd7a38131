"""Per-image record fields a method's model and objective declare for their batches: labels, metadata, captions.

Each field is a function here, `name(record, image_tokens) -> numpy value`, looked up by name: adding a field is
adding a function. `record` is a dataset record (features of the tfds builder, image still encoded) and
`image_tokens` the (captions, max_len) token ids of all of the image's captions. Fields reach the objective in the
train batch under their name and, when a model lists them in `IMAGE_FIELDS`/`TEXT_FIELDS`, the model's towers.
"""
import datetime

import numpy as np

from rsalign_jax.data import metadata_prompts


def scene(record, image_tokens):
  """The scene class (ClassLabel index; -1 where the dataset derives none) for class-supervised methods."""
  del image_tokens
  if "scene" not in record:
    raise ValueError("the method reads the 'scene' field (its model's IMAGE_FIELDS/TEXT_FIELDS or its objective's "
                     "batch_fields), but the dataset has no 'scene' feature (Sydney-Captions and user data carry no "
                     "scene label)")
  return np.int32(record["scene"])


CAPTION_SET_SIZE = 5  # captions per image in RSICD, RSITMD, UCM and Sydney (and the synthetic benchmark)


def caption_set(record, image_tokens):
  """(5, max_len) token ids of the image's captions, repeated in turn when it has fewer than 5 (AMFMN's prior
  similarity compares a caption with an image's references)."""
  if len(image_tokens) > CAPTION_SET_SIZE:
    raise ValueError(f"field 'caption_set': image {record.get('filename', '?')!r} has {len(image_tokens)} "
                     f"captions; the field holds {CAPTION_SET_SIZE}")
  rows = np.resize(np.arange(len(image_tokens)), CAPTION_SET_SIZE)
  return np.asarray(image_tokens, np.int32)[rows]


SPACETIME_FREQUENCIES = (1, 2, 4, 8)
SPACETIME_DIM = 4 * len(SPACETIME_FREQUENCIES) + 4
SPACETIME_YEAR_ORIGIN, SPACETIME_YEARS_PER_UNIT = 2015, 10.0


def spacetime(record, image_tokens):
  """(20,) float32 Fourier features of the acquisition metadata (CCLS2T's text tower input; our definition):

  sin(f lat), cos(f lat), sin(f lon), cos(f lon), each for f in (1, 2, 4, 8) in that order (lat, lon in radians;
  integer f keeps longitude periodic), then sin and cos of 2 pi (day of year - 1) / days in that year, the year as
  (year - 2015) / 10, and log10(GSD in metres).
  """
  del image_tokens
  meta = metadata_prompts.read_acquisition(record, "input field 'spacetime'")
  frequencies = np.asarray(SPACETIME_FREQUENCIES, np.float64)
  lat, lon = np.radians(meta.lat) * frequencies, np.radians(meta.lon) * frequencies
  year = meta.date.year
  days = (datetime.date(year + 1, 1, 1) - datetime.date(year, 1, 1)).days
  angle = 2 * np.pi * (meta.date.timetuple().tm_yday - 1) / days
  if meta.gsd <= 0:
    raise ValueError(f"input field 'spacetime': record 'gsd' {meta.gsd} is not a positive ground sample distance")
  return np.concatenate([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon),
                         [np.sin(angle), np.cos(angle), (year - SPACETIME_YEAR_ORIGIN) / SPACETIME_YEARS_PER_UNIT,
                          np.log10(meta.gsd)]]).astype(np.float32)


_HELPERS = ("get", "read")


def get(name):
  """The field function `name`, or a clear error naming the known fields."""
  function = globals().get(name)
  if name.startswith("_") or name in _HELPERS or getattr(function, "__module__", None) != __name__:
    known = sorted(k for k, v in globals().items() if getattr(v, "__module__", None) == __name__
                   and not k.startswith("_") and k not in _HELPERS)
    raise ValueError(f"unknown field {name!r}; known fields: {known} (rsalign_jax/data/fields.py)")
  return function


def read(source, index, tokens, names):
  """{name: (num_images, ...) array} of each field for every record of `source` (for evaluation)."""
  if not names:
    return {}
  functions = [get(name) for name in names]
  starts = np.searchsorted(index.record, np.arange(index.num_images + 1))
  values = {name: [] for name in names}
  for position in range(index.num_images):
    record = source[position]
    image_tokens = tokens[starts[position]:starts[position + 1]]
    for name, function in zip(names, functions):
      values[name].append(function(record, image_tokens))
  return {name: np.stack(v) for name, v in values.items()}
