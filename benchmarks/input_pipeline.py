"""Images/s of the training input pipeline on this machine, per dataset, output image size and grain worker count.

  python benchmarks/input_pipeline.py --sizes=80,256 --workers=0,2 --batches=20 --corpus_pairs=2048

Times `pipeline.TrainItems` + `pipeline.make_train_loader` with the HVSA augmentation `configlib.hvsa_augmentation`
(decode, resize to size*278/256, random rotation, random crop, normalize) over the train split of the synthetic
benchmark (`synthetic_rs/small`, 80 px PNG, built on first use) and, when its folder exists, of RSICD built from
../shared/data/rsicd_aid150 (150 px JPEG; built on first use into `<data_dir>/rsicd_aid150`, so that it never
shadows a build of the real RSICD), and of generated corpora read in place (`rsalign_jax.data.corpus`):
`--corpus_pairs` pairs of 256 px JPEG as img2dataset writes them, in webdataset tar shards of 512 pairs and in parquet
files of 512 rows with image bytes in 100-row groups (img2dataset's); their one-off index scan is timed apart.
Captions are not tokenised here (tokens are zeros): the trainer tokenises once, before the loader. The first batch
(worker start-up) is not timed. Prints a markdown table, the corpora's index scan rates, then the images/s the
default HVSA training step (`configs/hvsa.py`) consumes, for comparison.
"""
import io
import os
import pathlib
import tarfile
import tempfile
import time

import ml_collections
import numpy as np
import PIL.Image
from absl import app
from absl import flags

from rsalign_jax import configlib
from rsalign_jax.data import corpus
from rsalign_jax.data import pipeline
from rsalign_jax.data import sources

import timing

_SIZES = flags.DEFINE_list("sizes", ["80", "256"], "Output image sizes.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker counts.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches after one untimed batch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size (the configs' default).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets).")
_RSICD_AID150 = flags.DEFINE_string(
    "rsicd_aid150", str(pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/rsicd_aid150"),
    "RSICD-layout folder (dataset_rsicd.json + RSICD_images/); skipped when absent.")
_CORPUS_PAIRS = flags.DEFINE_integer("corpus_pairs", 2048, "Pairs of each generated corpus (0: no corpus rows).")
_CORPUS_SHARD = 512
_MAX_LEN = 32


def dataset_configs():
  """(label, dataset config) of each benchmarked dataset."""
  data_dir = _DATA_DIR.value or sources.default_data_dir()
  configs = [("synthetic_rs/small (80 px PNG)",
              ml_collections.ConfigDict(dict(name="synthetic_rs/small", data_dir=data_dir, manual_dir="")))]
  if os.path.isdir(_RSICD_AID150.value):
    configs.append(("rsicd from rsicd_aid150 (150 px JPEG)", ml_collections.ConfigDict(dict(
        name="rsicd", data_dir=os.path.join(data_dir, "rsicd_aid150"), manual_dir=_RSICD_AID150.value))))
  return configs


def write_corpora(folder, pairs):
  """{label: corpus spec} of `pairs` generated 256 px JPEG pairs as webdataset shards and as parquet files."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top  (the corpus extra)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for shard in range(0, pairs, _CORPUS_SHARD):
    numbers = range(shard, min(shard + _CORPUS_SHARD, pairs))
    images = []
    for _ in numbers:  # smooth random scenes: JPEGs of a photo's size, not of a flat colour's
      coarse = PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).resize((256, 256), PIL.Image.BICUBIC)
      buf = io.BytesIO()
      coarse.save(buf, "JPEG", quality=95)
      images.append(buf.getvalue())
    keys, captions = [f"{i:09d}" for i in numbers], [f"generated scene number {i}" for i in numbers]
    with tarfile.open(os.path.join(folder, f"{shard // _CORPUS_SHARD:05d}.tar"), "w") as tar:
      for key, text, image in zip(keys, captions, images):
        for name, data in ((f"{key}.jpg", image), (f"{key}.txt", text.encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": keys, "caption": captions, "jpg": images}),
                   os.path.join(folder, f"{shard // _CORPUS_SHARD:05d}.parquet"), row_group_size=100)
  return {"webdataset corpus (256 px JPEG, tar)": f"webdataset:{folder}/*.tar",
          "parquet corpus (256 px JPEG bytes)": f"parquet:{folder}/*.parquet"}


def benchmarked_sources(folder, notes):
  """(label, source) of each benchmarked training split, corpora indexed under `folder` (their scan rates appended to
  `notes`)."""
  for label, config in dataset_configs():
    yield label, sources.open_split(config, "train")
  if not _CORPUS_PAIRS.value:
    return
  for label, spec in write_corpora(folder, _CORPUS_PAIRS.value).items():
    start = time.perf_counter()
    source = corpus.open_corpus(spec, index_dir=os.path.join(folder, "index"))
    seconds = time.perf_counter() - start
    notes.append(f"{label}: index scan of {len(source)} pairs in {seconds:.1f} s ({len(source) / seconds:.0f} "
                 f"pairs/s, once per corpus)")
    yield label, source


def time_loader(source, index, size, workers):
  """Seconds per batch of the training loader, after one untimed batch."""
  tokens = np.zeros((len(index.captions), _MAX_LEN), np.int32)
  lengths = np.ones((len(index.captions),), np.int32)
  items = pipeline.TrainItems(source, index, tokens, lengths, sampling="per_caption",
                              global_batch_size=_BATCH_SIZE.value, process_index=0, process_count=1, seed=0,
                              name="benchmark")
  loader = pipeline.make_train_loader(items, pp_spec=configlib.hvsa_augmentation(size), seed=0, worker_count=workers)
  batches = iter(loader)
  batch = next(batches)
  assert batch["image"].shape == (_BATCH_SIZE.value, size, size, 3), batch["image"].shape
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(batches)
  return (time.perf_counter() - start) / _BATCHES.value


def main(argv):
  del argv
  print(f"{os.cpu_count()} CPU cores, batch {_BATCH_SIZE.value}, {_BATCHES.value} timed batches\n")
  print("| dataset (train split) | output px | workers | s/batch | images/s |\n|---|---:|---:|---:|---:|")
  notes = []
  with tempfile.TemporaryDirectory() as folder:
    for label, source in benchmarked_sources(folder, notes):
      index = sources.CaptionIndex.read(source)
      for size in (int(s) for s in _SIZES.value):
        for workers in (int(w) for w in _WORKERS.value):
          seconds = time_loader(source, index, size, workers)
          print(f"| {label} | {size} | {workers} | {seconds:.3f} | {_BATCH_SIZE.value / seconds:.0f} |", flush=True)
  print("".join(f"\n{note}" for note in notes))
  config = timing.load_config("hvsa")
  step = timing.time_train_step(config, config.dataset.image_size)
  print(f"\nThe default HVSA training step (configs/hvsa.py: {config.dataset.image_size} px, batch "
        f"{config.input.batch_size}) consumes {step['images_per_s']:.0f} images/s ({step['s_per_step']:.3f} s/step).")


if __name__ == "__main__":
  app.run(main)
