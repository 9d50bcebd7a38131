"""Per-image record fields a method asks for in its batches (`config.input.fields`): labels, metadata, captions.

Each field is a function here, `name(record, image_tokens) -> numpy value`, looked up by name: adding a field is
adding a function. `record` is a dataset record (features of the tfds builder, image still encoded) and
`image_tokens` the (captions, max_len) token ids of all of the image's captions. Fields reach the objective in the
train batch under their name and, when a model lists them in `IMAGE_FIELDS`/`TEXT_FIELDS`, the model's towers.
"""
import numpy as np


def scene(record, image_tokens):
  """The scene class (ClassLabel index; -1 where the dataset derives none) for class-supervised methods."""
  del image_tokens
  if "scene" not in record:
    raise ValueError("input.fields asks for 'scene' but the dataset has no 'scene' feature (Sydney-Captions and "
                     "user data carry no scene label)")
  return np.int32(record["scene"])


CAPTION_SET_SIZE = 5  # captions per image in RSICD, RSITMD, UCM and Sydney (and the synthetic benchmark)


def caption_set(record, image_tokens):
  """(5, max_len) token ids of the image's captions, repeated in turn when it has fewer than 5 (AMFMN's prior
  similarity compares a caption with an image's references)."""
  if len(image_tokens) > CAPTION_SET_SIZE:
    raise ValueError(f"input.fields 'caption_set': image {record.get('filename', '?')!r} has {len(image_tokens)} "
                     f"captions; the field holds {CAPTION_SET_SIZE}")
  rows = np.resize(np.arange(len(image_tokens)), CAPTION_SET_SIZE)
  return np.asarray(image_tokens, np.int32)[rows]


_HELPERS = ("get", "read")


def get(name):
  """The field function `name`, or a clear error naming the known fields."""
  function = globals().get(name)
  if name.startswith("_") or name in _HELPERS or getattr(function, "__module__", None) != __name__:
    known = sorted(k for k, v in globals().items() if getattr(v, "__module__", None) == __name__
                   and not k.startswith("_") and k not in _HELPERS)
    raise ValueError(f"input.fields: unknown field {name!r}; known fields: {known} (rsalign_jax/data/fields.py)")
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
