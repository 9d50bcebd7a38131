"""`synthetic_rs`: a procedural remote-sensing image-caption retrieval benchmark.

What: top-down "aerial" scenes of 21 classes (airport, harbour, beach, river,
bridge, pond, meadow, forest, farmland, desert, parking lot, storage tanks,
baseball field, tennis court, playground, intersection, industrial, three
residential densities, church square), each with five RSICD-style captions,
keywords and acquisition metadata (sensor, ground sample distance, date,
latitude/longitude). Classes are stratified, so every split is balanced to
within one image per class.

Why: it is the embedded default dataset. Real RS caption sets (RSICD, RSITMD,
UCM/Sydney captions) need manual downloads; this one is generated on the fly,
deterministically from (seed, split, index), so every training, evaluation and
test path of the library runs on a fresh machine with no network and no
TensorFlow, and gives identical data on every machine.

Difficulty design (so that a small CNN+GRU trained minutes on a CPU learns it,
but does not solve it from the class alone):
  * Many near-duplicate captions: within a class, captions share the scene noun
    (with synonyms) and templates, and ~25% of images repeat 1-4 sentences over
    their 5 slots, as RSICD does. Image-text retrieval within a class needs the
    object counts, colours, sizes, positions and relations the captions state.
  * Confusable classes: three residential densities; river / bridge / pond;
    beach / harbour; meadow / farmland; baseball / tennis / playground.
  * Appearance varies beyond the caption: textured backgrounds, random
    brightness, contrast, haze and per-band gain, sensor noise, a random
    dihedral rotation, seasonal vegetation colour and a ground-sample-distance
    dependent object scale, so pixels are never class-constant.
  * Metadata is informative but weak: scene-dependent regions (coasts for
    beaches and harbours, desert belts for deserts), sensors (Sentinel-2 only
    for landscapes, Gaofen-2 more likely over China), and season/latitude drive
    vegetation colour, so metadata-conditioned methods have something to use.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rsalign_jax.data.synthetic_rs import captions as captions_lib
from rsalign_jax.data.synthetic_rs import scenes

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(eq=False)
class SyntheticRsConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of one `synthetic_rs` variant."""

  image_size: int = 64
  num_train: int = 2000
  num_val: int = 300
  num_test: int = 500
  seed: int = 0

  @property
  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def _encode_png(image: np.ndarray) -> bytes:
  """PNG bytes, encoded with PIL: tfds can only encode numpy images with TensorFlow."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class SyntheticRs(tfds.core.GeneratorBasedBuilder):
  """Procedural RS image-caption benchmark; registered by tfds as `synthetic_rs`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticRsConfig(name="tiny", description="Unit tests: 32 px, 64/16/16 images.",
                        image_size=32, num_train=64, num_val=16, num_test=16),
      SyntheticRsConfig(name="small", description="CPU default: 80 px, 2000/300/500 images.",
                        image_size=80, num_train=2000, num_val=300, num_test=500),
      SyntheticRsConfig(name="base", description="128 px, 10000/1000/1000 images.",
                        image_size=128, num_train=10000, num_val=1000, num_test=1000),
      SyntheticRsConfig(name="large", description="256 px, 20000/2000/2000 images.",
                        image_size=256, num_train=20000, num_val=2000, num_test=2000),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=captions_lib.NUM_CAPTIONS),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "filename": tfds.features.Text(),
            "scene": tfds.features.ClassLabel(names=scenes.SCENE_CLASSES),
            "keywords": tfds.features.Sequence(tfds.features.Text()),
            "sensor": tfds.features.Text(),
            "gsd": tfds.features.Scalar(dtype=np.float32),
            "date": tfds.features.Text(),
            "lat": tfds.features.Scalar(dtype=np.float32),
            "lon": tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: every example is generated.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    """Yields (image_id, example); filenames number images across all splits."""
    config = self.builder_config
    first_number = sum(config.split_sizes[s] for s in SPLITS[:SPLITS.index(split)])
    for image_id in range(config.split_sizes[split]):
      example = scenes.generate_example(config.seed, split, image_id, config.image_size)
      yield image_id, {
          **example,
          "image": _encode_png(example["image"]),
          "image_id": image_id,
          "filename": f"{example['scene']}_{first_number + image_id}.png",
      }
