"""HVSA at the paper's sizes (`configs/hvsa.py:rsitmd`) through the real trainer, on a synthetic RSITMD-layout dataset.

  python benchmarks/hvsa_speed.py [--batches=32,64] [--reps=3] [--warmup=3] [--steps=8] [--peer_report=PEER.json]

Writes (once) 256 px JPEGs and `dataset_RSITMD.json` with 5 captions per image into `--cache_dir`, then for each
global batch runs `train.train_and_evaluate` in `--reps` fresh subprocesses (input pipeline included) and reports
caption-image pairs/s over the timed steps (the trainer's per-step `perf/seconds_per_step`, warm-up steps left out),
the peak summed RSS of the child's process tree until its last step, and XLA's per-device temporary memory of the
train step; then times the jitted `embed_images` / `embed_texts` towers. Prints markdown tables; `--peer_report`
(JSON `{"train": {"32": pairs_per_s, ...}, "infer": {"image": images_per_s, "text": captions_per_s}}`) adds the
peer's figures and project/peer ratios.
"""
import functools
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
from absl import app
from absl import flags
from PIL import Image

from rsalign_jax import experiment, train
from rsalign_jax.data import rsitmd
from rsalign_jax.data import sources

import timing

_BATCHES = flags.DEFINE_list("batches", ["32", "64"], "Global batch sizes to train at.")
_REPS = flags.DEFINE_integer("reps", 3, "Training runs (fresh processes) per batch size.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed first steps of each run (the first one compiles).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps of each run, after the warm-up steps.")
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 64, "Batch of the inference timing (0: skip it).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "/tmp/hvsa_speed", "Synthetic dataset, tfds build and run workdirs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir (default: <cache_dir>/tfds_<train>_<test>).")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 512, "Images of the official train split (re-split 0.9/0.1).")
_TEST_IMAGES = flags.DEFINE_integer("test_images", 64, "Images of the test split (tested once, after timing).")
_WORKER_COUNT = flags.DEFINE_integer("worker_count", None, "grain workers (default: the config's input.worker_count).")
_PAPER_SIZE = flags.DEFINE_bool("paper_size", True, "The paper's model; False: the CPU-size model of configs/hvsa.py.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Training/inference image side (default: the config's 256).")
_PEER_REPORT = flags.DEFINE_string("peer_report", "", "JSON of the peer's figures: adds peer and ratio columns.")
_CHILD = flags.DEFINE_enum("child", "", ["", "train", "infer"], "Internal: run one measurement, print one JSON line.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: the train child's workdir.")
_TEMP_MEMORY = flags.DEFINE_bool("temp_memory", False, "Internal: the train child also compiles the step for XLA's "
                                 "temporary memory.")

# Number of RSITMD training captions with n = 0..34 words (index n), measured from the train split of the published
# dataset_RSITMD.json (words as split on whitespace; mean 10.3 words, per-batch max median 19 at batch 32, 22 at 64).
CAPTION_WORD_COUNTS = (0, 0, 0, 6, 495, 841, 1335, 2353, 2728, 2586, 2276, 2101, 1629, 1276, 978, 790, 622, 405, 332,
                       203, 135, 107, 82, 55, 37, 21, 15, 8, 10, 4, 2, 1, 1, 0, 1)
# The synthetic captions' words: remote-sensing nouns, adjectives, verbs, counts and the stopwords between them.
VOCABULARY = """
airport runway runways plane planes airplane airplanes terminal apron hangar building buildings house houses roof
roofs road roads street streets highway bridge bridges river lake pond ponds water sea ocean beach sand coast shore
waves boat boats ship ships harbor port dock pier trees tree forest grass grassland meadow field fields farmland
crop crops land bareland desert dune dunes mountain mountains hill hills rock rocks church tower square plaza park
playground court courts stadium track baseball diamond tennis basketball football soccer pool swimming parking lot
lots car cars vehicle vehicles truck trucks train trains railway station rail tracks viaduct overpass intersection
crossroads roundabout residential area areas district center commercial industrial factory factories warehouse
warehouses tank tanks storage container containers school campus resort hotel villa villas lawn lawns garden
gardens vegetation bushes shrubs path paths lane lanes sidewalk fence wall walls yard yards block blocks row rows
line lines patch patches piece pieces part parts side sides edge corner middle top bottom left right island bay
canal stream farm greenhouse greenhouses chimney pipeline grid pattern shape ground soil surface space spaces
green dark light white gray red blue brown yellow orange black large small big tall short long wide narrow dense
sparse many several some few two three four five six dozens neat regular irregular rectangular circular round
curved straight parallel bare open busy empty crowded old new modern high low tiny huge flat winding deep shallow
clear calm bright various different neatly densely sparsely closely evenly orderly
a an the of in on at with and near next to beside around along across between by there is are it its which that
this these those has have from into over under through while as each other both also
located lies lie stands stand built parked surrounded divided covered planted arranged crossing crosses runs run
passing passes connected scattered distributed lined decorated filled separated situated placed spread surround
"""
IMAGE_SIZE = 256  # RSITMD's images are 256 x 256
RSS_SAMPLE_SECONDS = 0.2
INFER_WARMUP, INFER_CALLS = 2, 5


def sample_word_counts(rng, n):
  counts = np.asarray(CAPTION_WORD_COUNTS, np.float64)
  return rng.choice(len(counts), size=n, p=counts / counts.sum())


def random_captions(rng, batch_size, vocab_size, max_len):
  """(tokens, lengths) int32: random 0-padded token ids whose lengths follow RSITMD's caption word counts."""
  lengths = np.clip(sample_word_counts(rng, batch_size), 1, max_len)
  tokens = np.where(np.arange(max_len) < lengths[:, None], rng.integers(1, vocab_size, (batch_size, max_len)), 0)
  return tokens.astype(np.int32), lengths.astype(np.int32)


def texture(rng):
  """A seeded (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 image: smooth colour blobs at three scales plus pixel noise."""
  pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 127.5, np.float32)
  for cells, amplitude in ((4, 0.6), (16, 0.3), (64, 0.15)):
    grid = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
    pixels += amplitude * (np.asarray(grid.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32) - 127.5)
  pixels += rng.normal(0, 8, pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8)


def dataset_dir():
  return pathlib.Path(_CACHE_DIR.value) / f"rsitmd_synthetic_{_TRAIN_IMAGES.value}_{_TEST_IMAGES.value}"


def write_dataset(directory, seed=0):
  """RSITMD's published layout in `directory` (kept if its json exists): `images/<class>_<n>.jpg` and
  `dataset_RSITMD.json` (Karpathy format, 5 captions and 1-5 keywords per image, splits train and test)."""
  json_path = directory / rsitmd.Rsitmd.JSON_NAME
  if json_path.exists():
    return
  image_dir = directory / rsitmd.Rsitmd.IMAGE_DIR
  image_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = VOCABULARY.split()
  entries = []
  for i in range(_TRAIN_IMAGES.value + _TEST_IMAGES.value):
    filename = f"{rsitmd.SCENE_CLASSES[i % len(rsitmd.SCENE_CLASSES)]}_{i}.jpg"
    Image.fromarray(texture(rng)).save(image_dir / filename, quality=90)
    captions = [[str(w) for w in rng.choice(words, n)] for n in sample_word_counts(rng, 5)]
    entries.append({"filename": filename, "imgid": i, "split": "train" if i < _TRAIN_IMAGES.value else "test",
                    "sentids": list(range(5 * i, 5 * i + 5)),
                    "sentences": [{"raw": " ".join(c), "tokens": c, "imgid": i, "sentid": 5 * i + j}
                                  for j, c in enumerate(captions)],
                    "keywords": [str(w) for w in rng.choice(words, rng.integers(1, 6), replace=False)]})
  json_path.write_text(json.dumps({"dataset": "rsitmd", "images": entries}))  # last: it marks the dataset complete


def make_config(batch_size):
  """`configs/hvsa.py:rsitmd` on the synthetic dataset at `batch_size`: warm-up + timed steps, a log line per step,
  no validation, no random-init test, and a checkpoint only after the last step (whose time is logged before it)."""
  data_dir = _DATA_DIR.value or os.path.join(_CACHE_DIR.value, f"tfds_{_TRAIN_IMAGES.value}_{_TEST_IMAGES.value}")
  arg = f"rsitmd,manual_dir={dataset_dir()},data_dir={data_dir}"
  if _IMAGE_SIZE.value:
    arg += f",image_size={_IMAGE_SIZE.value}"
  config = timing.load_config("hvsa", arg)
  if not _PAPER_SIZE.value:
    config.model = timing.load_config("hvsa").model
  config.input.batch_size = batch_size
  if _WORKER_COUNT.value is not None:
    config.input.worker_count = _WORKER_COUNT.value
  config.total_steps = _WARMUP.value + _STEPS.value
  config.log_every_steps = 1
  config.checkpoint_every_steps = config.total_steps
  for name in ("val", "val_gallery", "random_init"):
    config.evals[name].enabled = False
  config.test_on_best = False
  config.eval_batch_size = batch_size
  return config


def read_step_seconds(workdir):
  """{step: perf/seconds_per_step} of a trainer's `metrics.jsonl` (complete lines only)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith("\n")]
  return {row["step"]: row["perf/seconds_per_step"] for row in rows if "perf/seconds_per_step" in row}


def device_info():
  return {"jax": jax.__version__, "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}


def train_child(batch_size):
  """Trains in `--workdir`; {device info, pairs_per_s, s_per_step, and temp_mib with --temp_memory}."""
  config = make_config(batch_size)
  train.train_and_evaluate(config, _WORKDIR.value)
  step_seconds = read_step_seconds(_WORKDIR.value)
  timed = [step_seconds[step] for step in range(_WARMUP.value + 1, config.total_steps + 1)]
  result = {**device_info(), "pairs_per_s": len(timed) * batch_size / sum(timed), "s_per_step": np.mean(timed)}
  if _TEMP_MEMORY.value:
    result["temp_mib"] = timing.time_train_step(config, config.dataset.image_size, steps=1)["temp_mib"]
  return result


def infer_child(batch_size):
  """{device info, image and text: per-call items/s} of the jitted towers on random images and tokens."""
  config = make_config(batch_size)
  vocab_size = timing.vocabulary_size(config)
  model = experiment.build_model(config, vocab_size)
  rng = np.random.default_rng(0)
  size = config.dataset.image_size
  images = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
  tokens, lengths = random_captions(rng, batch_size, vocab_size, config.text.max_len)
  images, tokens, lengths = jax.device_put((images, tokens, lengths))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.jit(functools.partial(model.init, train=False))(rngs, images[:2], tokens[:2], lengths[:2])
  towers = {"image": (jax.jit(lambda v, x: model.apply(v, x, train=False, method="embed_images")), (images,)),
            "text": (jax.jit(lambda v, t, n: model.apply(v, t, n, train=False, method="embed_texts")),
                     (tokens, lengths))}
  result = device_info()
  for name, (embed, args) in towers.items():
    for _ in range(INFER_WARMUP):
      jax.block_until_ready(embed(variables, *args))
    rates = []
    for _ in range(INFER_CALLS):
      start = time.perf_counter()
      jax.block_until_ready(embed(variables, *args))
      rates.append(batch_size / (time.perf_counter() - start))
    result[name] = rates
  return result


def tree_rss(process):
  """Summed RSS of `process` and its live descendants (grain workers), in bytes."""
  total = 0
  try:
    members = [process, *process.children(recursive=True)]
  except psutil.NoSuchProcess:
    return 0
  for member in members:
    try:
      total += member.memory_info().rss
    except psutil.NoSuchProcess:
      pass
  return total


def run_child(args, run_dir, sampling=lambda: True):
  """Runs this script with `args` (stdout and stderr into `run_dir`), sampling its process tree's summed RSS while
  `sampling()` holds; returns (the JSON of its last stdout line, peak RSS in bytes)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  flag_values = [f"--cache_dir={_CACHE_DIR.value}", f"--data_dir={_DATA_DIR.value}",
                 f"--train_images={_TRAIN_IMAGES.value}", f"--test_images={_TEST_IMAGES.value}",
                 f"--warmup={_WARMUP.value}", f"--steps={_STEPS.value}", f"--paper_size={_PAPER_SIZE.value}",
                 f"--image_size={_IMAGE_SIZE.value}", f"--infer_batch={_INFER_BATCH.value}"]
  if _WORKER_COUNT.value is not None:
    flag_values.append(f"--worker_count={_WORKER_COUNT.value}")
  with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
    child = subprocess.Popen([sys.executable, __file__, *args, *flag_values], stdout=out, stderr=err)
    process, peak, window_open = psutil.Process(child.pid), 0, True
    while child.poll() is None:
      window_open = window_open and sampling()
      if window_open:
        peak = max(peak, tree_rss(process))
      time.sleep(RSS_SAMPLE_SECONDS)
  if child.returncode:
    raise RuntimeError(f"{' '.join(args)} failed (exit {child.returncode}):\n"
                       f"{(run_dir / 'stderr.txt').read_text()[-4000:]}")
  return json.loads((run_dir / "stdout.txt").read_text().strip().splitlines()[-1]), peak


def still_training(workdir):
  """Whether the trainer in `workdir` has not yet logged its last step."""
  return _WARMUP.value + _STEPS.value not in read_step_seconds(workdir)


def train_runs(batch_size):
  """{pairs_per_s: [per run], s_per_step: [...], rss: [peak bytes until the last step], temp_mib, device info}."""
  runs = {"pairs_per_s": [], "s_per_step": [], "rss": []}
  for rep in range(_REPS.value):
    run_dir = pathlib.Path(_CACHE_DIR.value) / "runs" / f"train_b{batch_size}_r{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the trainer would resume from an old run's checkpoint
    workdir = run_dir / "workdir"
    result, peak = run_child(
        ["--child=train", f"--batches={batch_size}", f"--workdir={workdir}", f"--temp_memory={rep == 0}"], run_dir,
        sampling=functools.partial(still_training, workdir))
    shutil.rmtree(workdir / "checkpoints")  # ~0.4 GB per paper-size run; the metrics and logs stay
    print(f"batch {batch_size} run {rep + 1}/{_REPS.value}: {result['pairs_per_s']:.2f} pairs/s, "
          f"{result['s_per_step']:.3f} s/step, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    runs["pairs_per_s"].append(result.pop("pairs_per_s"))
    runs["s_per_step"].append(result.pop("s_per_step"))
    runs["rss"].append(peak)
    runs.update(result)
  return runs


def spread(values, digits=1):
  return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def peer_cells(peer, project):
  return f" {peer:.1f} | {project / peer:.2f} |" if peer else " | |"


def cpu_model():
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return names[0] if names else "unknown CPU"


def main(argv):
  del argv
  batches = [int(b) for b in _BATCHES.value]
  if _CHILD.value == "train":
    print(json.dumps(train_child(batches[0])))
    return
  if _CHILD.value == "infer":
    print(json.dumps(infer_child(_INFER_BATCH.value)))
    return
  write_dataset(dataset_dir())
  config = make_config(batches[0])
  sources.open_split(config.dataset, config.dataset.train_split)  # builds the tfds dataset outside the timed runs
  peer = {"train": {}, "infer": {}}
  if _PEER_REPORT.value:
    peer.update(json.loads(pathlib.Path(_PEER_REPORT.value).read_text()))
  train_results = {b: train_runs(b) for b in batches}
  infer, infer_rss = None, 0
  if _INFER_BATCH.value:
    infer, infer_rss = run_child(["--child=infer"], pathlib.Path(_CACHE_DIR.value) / "runs" / "infer")
  info = infer or next(iter(train_results.values()))
  model = "paper-size model" if _PAPER_SIZE.value else "CPU-size model"
  print(f"HVSA ({model}, configs/hvsa.py:rsitmd, {config.dataset.image_size} px) on jax {info['jax']}, "
        f"{info['devices']} x {info['device_kind']}, CPU {cpu_model()} ({os.cpu_count()} cores); synthetic RSITMD "
        f"layout {dataset_dir()} ({_TRAIN_IMAGES.value} train / {_TEST_IMAGES.value} test images, 5 captions each); "
        f"grain workers {config.input.worker_count}; {_WARMUP.value} warm-up + {_STEPS.value} timed steps per run, "
        f"{_REPS.value} fresh process(es) per batch\n")
  peer_header = " peer pairs/s | project/peer |" if _PEER_REPORT.value else ""
  print(f"| global batch | project pairs/s median (min–max) | s/step | peak RSS GiB (process tree) | "
        f"XLA temp MiB/device | steps timed |{peer_header}")
  print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if _PEER_REPORT.value else ""))
  for b, r in train_results.items():
    row = (f"| {b} | {spread(r['pairs_per_s'])} | {statistics.median(r['s_per_step']):.3f} | "
           f"{statistics.median(r['rss']) / 2**30:.2f} | {r['temp_mib']:.0f} | {_STEPS.value} x {_REPS.value} |")
    if _PEER_REPORT.value:
      row += peer_cells(peer["train"].get(str(b)), statistics.median(r["pairs_per_s"]))
    print(row)
  if infer is None:
    return
  peer_header = " peer items/s | project/peer |" if _PEER_REPORT.value else ""
  print(f"\nInference (jitted towers, {INFER_WARMUP} warm-up + {INFER_CALLS} timed calls; peak RSS "
        f"{infer_rss / 2**30:.2f} GiB)\n")
  print(f"| tower | batch | project items/s median (min–max) |{peer_header}")
  print("|---|---:|---:|" + ("---:|---:|" if _PEER_REPORT.value else ""))
  for tower in ("image", "text"):
    row = f"| {tower} | {_INFER_BATCH.value} | {spread(infer[tower])} |"
    if _PEER_REPORT.value:
      row += peer_cells(peer["infer"].get(tower), statistics.median(infer[tower]))
    print(row)


if __name__ == "__main__":
  app.run(main)
