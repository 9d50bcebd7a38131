"""Opening image-caption datasets: tfds builders (built into `data_dir` on first use) read with random access.

A dataset name `module/config` (e.g. `synthetic_rs/small`, `rsicd`, `amfmn_splits/ucm`) resolves to the builder
registered by importing `rsalign_jax.data.<module>`: adding a dataset is adding a module, never editing a table.
`dataset.corpus = "webdataset:GLOB"` or `"parquet:GLOB"` makes the training split a corpus read in place (`corpus`);
val and test still come from `dataset.name`.
"""
import dataclasses
import importlib
import os
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from rsalign_jax.data import corpus
from rsalign_jax.data import metadata_prompts
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import progress


def default_data_dir():
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def open_split(dataset_config, split):
  """Returns a random-access source of `split`, preparing the dataset first if needed.

  Records are dicts of numpy values; `image` stays encoded (bytes) so decoding is a preprocessing op.
  `dataset.captions = "metadata_prompt"` replaces each record's captions by its metadata prompt (`metadata_prompts`).
  """
  if dataset_config.get("corpus") and split == dataset_config.get("train_split"):
    return _open_corpus(dataset_config)
  name = dataset_config.name
  module = name.split("/")[0]
  try:
    importlib.import_module(f"rsalign_jax.data.{module}")
  except ModuleNotFoundError as e:
    if e.name != f"rsalign_jax.data.{module}":
      raise
    raise ValueError(f"dataset.name={name!r}: no module rsalign_jax/data/{module}.py registers a builder") from None
  _check_config(name, module)
  builder = tfds.builder(name, data_dir=dataset_config.get("data_dir") or default_data_dir(),
                         file_format="array_record")
  built, start = builder.data_path.exists(), time.monotonic()  # what download_and_prepare checks
  if not built:
    metric_writer.log("building dataset %s in %s", name, builder.data_dir)
  tfds.display_progress_bar(sys.stderr.isatty())  # tqdm bars are carriage returns and escape codes in a log file
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=dataset_config.get("manual_dir"), try_download_gcs=False))
  if not built:
    metric_writer.log("built dataset %s in %s", name, progress.format_duration(time.monotonic() - start))
  _check_not_empty(name, split, builder.info.splits)
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return metadata_prompts.with_captions(source, builder.info.features, dataset_config.get("captions", "captions"), name)


def _open_corpus(dataset_config):
  """The training split read from `dataset.corpus`, its shards indexed on first use into `dataset.index_dir`
  (default: `corpus_index` in the data dir); `dataset.caption_column`, `image_column` and `on_bad` as in `corpus`."""
  index_dir = dataset_config.get("index_dir") or os.path.join(
      dataset_config.get("data_dir") or default_data_dir(), "corpus_index")
  source = corpus.open_corpus(dataset_config.corpus, index_dir=os.path.expanduser(index_dir),
                              caption_column=dataset_config.get("caption_column", ""),
                              image_column=dataset_config.get("image_column", ""),
                              on_bad=dataset_config.get("on_bad", "skip"))
  return metadata_prompts.with_captions(source, {}, dataset_config.get("captions", "captions"), dataset_config.corpus)


def _check_config(name, module):
  """A config the builder lacks is an error listing the names it has (tfds' own message lists none)."""
  config = name.partition("/")[2].partition(":")[0]
  configs = tfds.builder_cls(module).builder_configs
  if config and config not in configs:
    raise ValueError(f"dataset.name={name!r}: builder {module} has no config {config!r}; expected "
                     f"--config.dataset.name= one of {', '.join(f'{module}/{c}' for c in configs)}")


def _check_not_empty(name, split, splits):
  """A named split the build left empty or absent is an error that says so (tfds would say only 'Unknown split')."""
  if any(c in split for c in "[+"):  # a slice or sum of splits: tfds checks each part
    return
  if split not in splits or not splits[split].num_examples:
    built = ", ".join(f"{s} ({info.num_examples} examples)" for s, info in splits.items()) or "none"
    raise ValueError(f"dataset {name!r}: split {split!r} is empty or absent in the build (built splits: {built}); "
                     "a build that skips missing images leaves out splits whose images are all missing: add the "
                     "images under dataset.manual_dir and rebuild, or name other splits "
                     "(dataset.train_split / val_split / test_split)")


def as_text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class CaptionIndex:
  """Every caption of a split, flattened: caption k belongs to record `record[k]` (its position in the source)."""
  captions: list
  record: np.ndarray
  image_ids: np.ndarray  # the dataset's image id of each record
  filenames: list  # per record

  @classmethod
  def read(cls, source):
    """Reads all captions of a source once (images are not decoded; a corpus gives them from its index, unread)."""
    if isinstance(source, corpus.CorpusSource):
      return cls(*source.caption_index())
    captions, record, image_ids, filenames = [], [], [], []
    for position in range(len(source)):
      example = source[position]
      texts = [as_text(c) for c in example["captions"]]
      captions.extend(texts)
      record.extend([position] * len(texts))
      image_ids.append(int(example.get("image_id", position)))
      filenames.append(as_text(example.get("filename", str(position))))
    return cls(captions, np.asarray(record, np.int64), np.asarray(image_ids, np.int64), filenames)

  @property
  def num_images(self):
    return len(self.image_ids)
