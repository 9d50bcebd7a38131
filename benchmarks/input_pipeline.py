"""Images/s of the training input pipeline on this machine, per dataset, output image size and grain worker count.

  python benchmarks/input_pipeline.py --sizes=80,256 --workers=0,2 --batches=20

Times `pipeline.TrainItems` + `pipeline.make_train_loader` with the HVSA augmentation `configlib.hvsa_augmentation`
(decode, resize to size*278/256, random rotation, random crop, normalize) over the train split of the synthetic
benchmark (`synthetic_rs/small`, 80 px PNG, built on first use) and, when its folder exists, of RSICD built from
../shared/data/rsicd_aid150 (150 px JPEG; built on first use into `<data_dir>/rsicd_aid150`, so that it never
shadows a build of the real RSICD). Captions are not tokenised here (tokens are zeros): the trainer tokenises once,
before the loader. The first batch (worker start-up) is not timed. Prints a markdown table, then the images/s the
default HVSA training step (`configs/hvsa.py`) consumes, for comparison.
"""
import os
import pathlib
import time

import ml_collections
import numpy as np
from absl import app
from absl import flags

from rsalign_jax import configlib
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
  for label, config in dataset_configs():
    source = sources.open_split(config, "train")
    index = sources.CaptionIndex.read(source)
    for size in (int(s) for s in _SIZES.value):
      for workers in (int(w) for w in _WORKERS.value):
        seconds = time_loader(source, index, size, workers)
        print(f"| {label} | {size} | {workers} | {seconds:.3f} | {_BATCH_SIZE.value / seconds:.0f} |", flush=True)
  config = timing.load_config("hvsa")
  step = timing.time_train_step(config, config.dataset.image_size)
  print(f"\nThe default HVSA training step (configs/hvsa.py: {config.dataset.image_size} px, batch "
        f"{config.input.batch_size}) consumes {step['images_per_s']:.0f} images/s ({step['s_per_step']:.3f} s/step).")


if __name__ == "__main__":
  app.run(main)
