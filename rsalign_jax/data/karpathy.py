"""Real image-caption datasets read from their published files, and the Karpathy-style json most of them use.

Two layers:
  * What every real-dataset builder shares (`CaptionDatasetBuilder`): a reader turns the dataset's own files in
    `manual_dir` into `Record`s (image path, exactly 5 captions, ids, labels); the builder checks that every image is
    on disk, adds the papers' train/val re-split and writes the records, image bytes as stored. The records have the
    feature names of `synthetic_rs` (`image`, `captions`, `image_id`, `filename`, `keywords`, `scene`), so the trainer
    reads any of them unchanged.
  * The Karpathy json (`images[].filename, imgid, split, sentences[].raw`) of RSICD, RSITMD, UCM-Captions and
    Sydney-Captions (`read_karpathy_json`, `KarpathyBuilder`).

Repairs are never silent: each one is recorded on its record, logged per split and saved in the dataset's
`metadata.json` (`builder.info.metadata["repairs"][split]`):
  * `padded_to_5`: an image with fewer than 5 captions gets 5 by cycling its own captions, as RSICD itself fills
    its 5 slots; `truncated_to_5`: an image with more keeps its first 5.
  * `empty_caption_replaced`: an empty (or blank) caption is replaced, like a missing one, by cycling the image's
    other captions. An image with no non-empty caption is an error naming it.
  * `missing_image_skipped`: images named in the dataset files but absent on disk are an error (count and first 5
    names) unless the `*skip_missing_images` builder config is used, which skips them.

A `manual_dir` that is absent, empty or in another layout is an error naming the folder, the layout the builder
expects (`CaptionDatasetBuilder.layout`) and what the folder holds.
"""
import abc
import collections
import dataclasses
import io
import json
import os
import pathlib
import re
import reprlib
import sys

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

NUM_CAPTIONS = 5
OFFICIAL_SPLITS = ("train", "val", "test")
PAPERS_SPLITS = ("train_papers", "val_papers")
# The papers' validation split (`generate_random_samples` of HVSA and AMFMN, docs/METHODS.md §1.1): their training
# images are shuffled, the first int(p * N) train and the rest validate. HVSA uses p = 0.9, AMFMN 0.8. Their training
# images are every non-test image (RSICD's json train + val = AMFMN's 9,828-image train file), so the builders
# re-split the union of the non-test splits. They shuffle with Python's `random`; here numpy's generator with a fixed
# seed.
PAPERS_TRAIN_FRACTION = 0.9
PAPERS_SPLIT_SEED = 0
NO_SCENE = -1  # ClassLabel value of images whose file name carries no class (RSICD's `00001.jpg` style names)

PADDED = "padded_to_5"
TRUNCATED = "truncated_to_5"
EMPTY_REPLACED = "empty_caption_replaced"
MISSING_SKIPPED = "missing_image_skipped"

_STORED_FORMATS = ("JPEG", "PNG")  # the encodings tfds.features.Image stores; others are re-encoded as PNG
_CLASS_PREFIX = re.compile(r"^([A-Za-z]+)_\d+\.\w+$")


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a dataset as its files describe it; the image itself is read only when the dataset is written."""
  path: pathlib.Path
  filename: str
  image_id: int
  captions: tuple[str, ...]
  keywords: tuple[str, ...] = ()
  labels: dict = dataclasses.field(default_factory=dict)  # extra features, e.g. {"scene": 3}
  repairs: tuple[str, ...] = ()  # one entry per repair made while reading, e.g. ("padded_to_5",)


def read_text(path):
  """A UTF-8 text file's content; errors name the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def five_captions(texts, where):
  """Exactly 5 captions from an image's `texts`, and the repairs that took (see the module docstring)."""
  texts = [t.strip() for t in texts]
  kept = [t for t in texts if t]
  if not kept:
    raise ValueError(f"{where}: no non-empty caption; every image needs at least one")
  repairs = [EMPTY_REPLACED] * (len(texts) - len(kept))
  if len(texts) < NUM_CAPTIONS:
    repairs.append(PADDED)
  elif len(texts) > NUM_CAPTIONS:
    repairs.append(TRUNCATED)
  return tuple(kept[i % len(kept)] for i in range(NUM_CAPTIONS)), tuple(repairs)


def scene_from_prefix(filename, classes, where):
  """The class index of a `<class>_<n>.<ext>` file name, or NO_SCENE when the name has no class prefix."""
  match = _CLASS_PREFIX.match(filename)
  if not match:
    return NO_SCENE
  prefix = match.group(1).lower()
  if prefix not in classes:
    raise ValueError(f"{where}: file name prefix {prefix!r} is not one of the {len(classes)} classes {list(classes)}")
  return classes.index(prefix)


def read_image(path):
  """The image file's bytes when they are JPEG or PNG; any other format PIL reads (TIFF, BMP, ...) re-encoded as
  RGB PNG, since tfds stores only JPEG and PNG. Every image is decoded once, so a corrupt file fails the build."""
  data = pathlib.Path(path).read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in _STORED_FORMATS:
        return data
      buffer = io.BytesIO()
      image.convert("RGB").save(buffer, format="PNG")
      return buffer.getvalue()
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: unreadable image ({e})") from None


def papers_split(records, fraction=PAPERS_TRAIN_FRACTION, seed=PAPERS_SPLIT_SEED):
  """The papers' re-split of training images into (train, val), by image, each in the input order."""
  order = np.random.default_rng(seed).permutation(len(records))
  cut = int(fraction * len(records))
  return [records[i] for i in np.sort(order[:cut])], [records[i] for i in np.sort(order[cut:])]


def listing(folder, limit=8):
  """What `folder` holds, for error messages: its first `limit` entries by name (folders end in /)."""
  names = sorted(p.name + "/" * p.is_dir() for p in pathlib.Path(folder).iterdir())
  more = f", ... ({len(names)} entries)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more or "nothing"


def manual_dir_of(dl_manager, dataset, layout):
  """`dl_manager.manual_dir` as a path; when it is absent or empty, an error that says what to put there and how."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as e:  # tfds' message would add the multi-line download instructions
    found = re.match(r"Manual directory (.+) does not exist or is empty", str(e))
    problem = f"manual_dir {found.group(1)} does not exist or is empty" if found else "no manual_dir"
    if found and pathlib.Path(found.group(1)) == pathlib.Path(dl_manager.download_dir) / "manual":
      problem = f"dataset.manual_dir is not set (and tfds' default {found.group(1)} is absent or empty)"
    raise FileNotFoundError(
        f"{dataset}: {problem}; expected {layout}. Set --config.dataset.manual_dir (or manual_dir= in the "
        f"config arg) to the folder that holds them.") from None


@dataclasses.dataclass(eq=False)
class CaptionBuilderConfig(tfds.core.BuilderConfig):
  """`skip_missing_images`: skip (and count) images named in the dataset files but absent, instead of failing."""
  skip_missing_images: bool = False


def skip_missing_config_name(name):
  """The builder config that skips missing images of config `name`."""
  return "skip_missing_images" if name == "default" else f"{name}_skip_missing_images"


def with_skip_missing_variants(configs):
  """Each config, followed by its variant that skips missing images (`default` -> `skip_missing_images`,
  `rsicd` -> `rsicd_skip_missing_images`)."""
  variants = []
  for config in configs:
    variants.append(config)
    variants.append(dataclasses.replace(
        config, name=skip_missing_config_name(config.name), skip_missing_images=True,
        description=f"{config.description} Images missing on disk are skipped and counted.".strip()))
  return variants


class CaptionDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the `Record`s a subclass reads from `manual_dir`: official splits plus the papers' re-split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = with_skip_missing_variants([CaptionBuilderConfig(name="default", description="As published.")])
  HOMEPAGE = ""
  CITATION = ""

  @abc.abstractmethod
  def _read_splits(self, manual_dir):
    """Returns {official split: [Record]} read from the dataset's files in `manual_dir`."""

  def _label_features(self):
    """Features beyond the common ones, filled from `Record.labels`."""
    return {}

  def layout(self):
    """What `manual_dir` must hold, as one phrase for error messages."""
    return "the dataset's files in manual_dir"

  @property
  def dataset_name(self):
    """The `dataset.name` that selects this builder and config."""
    config = self.builder_config.name
    return self.name if config == "default" else f"{self.name}/{config}"

  def _info(self):
    return self.dataset_info_from_configs(
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=NUM_CAPTIONS),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "filename": tfds.features.Text(),
            "keywords": tfds.features.Sequence(tfds.features.Text()),
            **self._label_features(),
        }),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,  # records stay in the order of the dataset's files
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = manual_dir_of(dl_manager, self.dataset_name, self.layout())
    splits = self._drop_or_fail_on_missing_images(self._read_splits(manual_dir), manual_dir)
    pool = [record for split, records in splits.items() if split != "test" for record in records]
    splits.update(zip(PAPERS_SPLITS, papers_split(pool)))
    self._report_repairs(splits)
    empty = [split for split, records in splits.items() if not records]
    if empty:
      logging.warning("%s: no images in split(s) %s; they are not written", self.name, empty)
    return {split: self._generate_examples(records) for split, records in splits.items() if records}

  def _drop_or_fail_on_missing_images(self, splits, manual_dir):
    missing = {split: [r for r in records if not r.path.is_file()] for split, records in splits.items()}
    names = [str(r.path.relative_to(manual_dir)) for records in missing.values() for r in records]
    if not names:
      return splits
    if not self.builder_config.skip_missing_images:
      raise FileNotFoundError(
          f"{self.dataset_name}: {len(names)} images named in the dataset files are missing under {manual_dir}; "
          f"first 5: {names[:5]}. Add them, or skip them (counted in the dataset's metadata) with "
          f"--config.dataset.name={self.name}/{skip_missing_config_name(self.builder_config.name)}")
    logging.warning("%s: skipping %d images named in the dataset files but missing under %s (%s); first 5: %s",
                    self.name, len(names), manual_dir,
                    ", ".join(f"{split} {len(m)}" for split, m in missing.items() if m), names[:5])
    repairs = self.info.metadata.setdefault("repairs", {})
    for split, records in missing.items():
      if records:
        repairs.setdefault(split, {})[MISSING_SKIPPED] = len(records)
    return {split: [r for r in records if r.path.is_file()] for split, records in splits.items()}

  def _report_repairs(self, splits):
    repairs = self.info.metadata.setdefault("repairs", {})
    for split, records in splits.items():
      counts = collections.Counter(repair for record in records for repair in record.repairs)
      counts.update(repairs.get(split, {}))
      repairs[split] = dict(sorted(counts.items()))
      if counts and split not in PAPERS_SPLITS:
        logging.warning("%s %s (%d images): repairs %s", self.name, split, len(records), repairs[split])

  def _generate_examples(self, records):
    for key, record in enumerate(records):
      yield key, {
          "image": read_image(record.path),
          "captions": list(record.captions),
          "image_id": record.image_id,
          "filename": record.filename,
          "keywords": list(record.keywords),
          **record.labels,
      }


# --------------------------------------------------------------------------------------------- Karpathy json


def _field(entry, name, kind, where, expected):
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an object, got {reprlib.repr(entry)}")
  if name not in entry:
    raise ValueError(f"{where}: missing field {name!r}; expected {expected}")
  value = entry[name]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise ValueError(f"{where}: field {name!r} is {reprlib.repr(value)}; expected {expected}")
  return value


def load_karpathy_images(json_path):
  """The `images` list of a Karpathy-style json; errors name the file and, for bad JSON, the position."""
  try:
    data = json.loads(read_text(json_path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{json_path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{json_path}: expected a JSON object with an 'images' list (Karpathy format)")
  return data["images"]


def read_karpathy_json(json_path, image_dir, *, scene_of=None, with_keywords=False):
  """Reads a Karpathy-style json into {official split: [Record]}, images at `image_dir / filename`.

  Each image needs `filename`, `imgid` (unique int), `split` (train/val/test) and `sentences` (objects with a `raw`
  caption), plus `keywords` (a list of strings) when `with_keywords`. `scene_of(filename, image_id, where)` gives
  the `scene` label, if any. Extra fields (`sentids`, `tokens`, ...) are ignored.
  """
  json_path, image_dir = pathlib.Path(json_path), pathlib.Path(image_dir)
  splits = {split: [] for split in OFFICIAL_SPLITS}
  first_index_of_id = {}
  for index, entry in enumerate(load_karpathy_images(json_path)):
    where = f"{json_path}: images[{index}]"
    filename = _field(entry, "filename", str, where, f"the image's file name in {image_dir.name}/")
    where = f"{where} ({filename})"
    image_id = _field(entry, "imgid", int, where, "an integer image id")
    if image_id in first_index_of_id:
      raise ValueError(f"{where}: imgid {image_id} repeats images[{first_index_of_id[image_id]}]; ids must be unique")
    first_index_of_id[image_id] = index
    split = _field(entry, "split", str, where, f"one of {list(OFFICIAL_SPLITS)}")
    if split not in splits:
      raise ValueError(f"{where}: split {split!r} is not one of {list(OFFICIAL_SPLITS)}")
    sentences = _field(entry, "sentences", list, where, "a list of {'raw': caption} objects")
    texts = [_field(s, "raw", str, f"{where}: sentences[{j}]", "the caption text") for j, s in enumerate(sentences)]
    captions, repairs = five_captions(texts, where)
    keywords = ()
    if with_keywords:
      keywords = tuple(_field(entry, "keywords", list, where, "a list of keyword strings"))
      if not all(isinstance(k, str) for k in keywords):
        raise ValueError(f"{where}: field 'keywords' is {reprlib.repr(list(keywords))}; expected a list of strings")
    labels = {"scene": scene_of(filename, image_id, where)} if scene_of else {}
    splits[split].append(Record(image_dir / filename, filename, image_id, captions, keywords, labels, repairs))
  return splits


class KarpathyBuilder(CaptionDatasetBuilder, skip_registration=True):
  """A dataset published as `manual_dir/JSON_NAME` (Karpathy format) and `manual_dir/IMAGE_DIR/<filename>`.

  `scene` is a ClassLabel over SCENE_CLASSES from `<class>_<n>` file names (NO_SCENE for other names); a dataset
  whose scene is not derivable sets SCENE_CLASSES = () and has no `scene` feature. AMFMN_NAME is the dataset's name
  in the AMFMN/HVSA releases (`data/<name>_precomp`), which is its config of the `amfmn_splits` builder.
  """

  JSON_NAME = ""
  IMAGE_DIR = ""
  SCENE_CLASSES = ()
  WITH_KEYWORDS = False
  AMFMN_NAME = ""

  def _label_features(self):
    return {"scene": tfds.features.ClassLabel(names=self.SCENE_CLASSES)} if self.SCENE_CLASSES else {}

  def layout(self):
    return f"{self.JSON_NAME} (Karpathy format) and {self.IMAGE_DIR}/ in manual_dir"

  @classmethod
  def scene_of_file(cls, filename, where):
    """The scene class of an image from its file name alone, as the AMFMN/HVSA split files give it."""
    return scene_from_prefix(filename, cls.SCENE_CLASSES, where)

  def scene_of(self, filename, image_id, where):
    del image_id
    return self.scene_of_file(filename, where)

  def _read_splits(self, manual_dir):
    for path in (manual_dir / self.JSON_NAME, manual_dir / self.IMAGE_DIR):
      if not path.exists():
        hint = ""
        if (manual_dir / "train_caps.txt").is_file():  # the first of the AMFMN/HVSA split files
          hint = f" Those are AMFMN/HVSA split files: use --config.dataset.name=amfmn_splits/{self.AMFMN_NAME}"
        raise FileNotFoundError(f"{path}: not found; {self.dataset_name} expects {self.layout()} (manual_dir "
                                f"{manual_dir} holds: {listing(manual_dir)}).{hint}")
    return read_karpathy_json(manual_dir / self.JSON_NAME, manual_dir / self.IMAGE_DIR,
                              scene_of=self.scene_of if self.SCENE_CLASSES else None,
                              with_keywords=self.WITH_KEYWORDS)
