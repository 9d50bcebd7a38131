"""A dataset split as evaluation and serving read it: records, captions, token ids and the towers' per-image fields.

`experiment.Setup.split(name)` reads and tokenises each split once per run and hands the same `Split` to the
evaluator, the gallery pictures, export and search.
"""
import dataclasses
import io

import numpy as np
import PIL.Image

from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import sources


@dataclasses.dataclass
class Split:
  """`inputs` is `source` as the model reads it (cached trunk outputs in place of pixels where the run caches them);
  captions are flattened as in `sources.CaptionIndex`."""
  name: str
  source: object
  inputs: object
  index: sources.CaptionIndex
  tokens: np.ndarray  # (captions, max_len) int32, 0-padded
  lengths: np.ndarray  # (captions,) int32
  image_fields: dict  # name -> (images, ...): the image tower's per-image inputs
  text_fields: dict  # name -> (captions, ...): the text tower's per-image inputs, one row per caption

  def image(self, position):
    """The record's image as a PIL RGB image (for pictures)."""
    with PIL.Image.open(io.BytesIO(self.source[position]["image"])) as image:
      return image.convert("RGB")


def read(name, source, inputs, text_encoder, max_len, image_fields=(), text_fields=()):
  """The `Split` of records `source`: captions tokenised by `text_encoder` (`encode_batch`), fields read."""
  index = sources.CaptionIndex.read(source)
  tokens, lengths, _ = text_encoder.encode_batch(index.captions, max_len)
  values = fields_lib.read(source, index, tokens, sorted(set(image_fields) | set(text_fields)))
  return Split(name, source, inputs, index, tokens, lengths, {n: values[n] for n in image_fields},
               {n: values[n][index.record] for n in text_fields})
