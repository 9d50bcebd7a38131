"""The batch-size study: heads on frozen, cached trunks (`configs/frozen_trunks.py`) trained at several global batch
sizes for the same number of epochs, with the softmax and the sigmoid loss; prints a markdown table.

  python benchmarks/large_batch.py --dataset=rsicd --manual_dir=PATH --data_dir=DIR --workdir=/tmp/large_batch \
    --batches=128,512,2048,8192,16384 --losses=softmax,sigmoid --arg=sampling=per_caption,epochs=10

Each row is one `python -m rsalign_jax.main --config=configs/frozen_trunks.py:<arg>` run in its own process (the
command is printed), in `--workdir/<row>`; a row whose workdir holds results.json is read, not re-run. Columns: the
best validation mR and the test mR of that checkpoint, the number of steps, the median seconds per step (the
trainer's `perf/seconds_per_step` windows after the first, which holds the compilation; `*`: the run logged only
that one), XLA's per-device buffers of the compiled train step (`perf/step_memory_mib`) and the wall time of the
run. The trunk cache is shared by every row
(the first run computes it).
"""
import json
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
_DATASET = flags.DEFINE_string("dataset", "rsicd", "configs/frozen_trunks.py's dataset.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "The dataset's manual_dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where its tfds build (and the trunk cache) go.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/large_batch", "One workdir per row under this folder.")
_BATCHES = flags.DEFINE_list("batches", ["128", "512", "2048", "8192"], "Global batch sizes.")
_LOSSES = flags.DEFINE_list("losses", ["softmax", "sigmoid"], "Losses.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (a row per seed; the table gives their mean).")
_ARG = flags.DEFINE_string("arg", "sampling=per_caption,epochs=10", "Further configs/frozen_trunks.py args.")


def config_arg(batch, loss, seed):
  parts = [_DATASET.value, f"batch={batch}", f"loss={loss}", f"seed={seed}", _ARG.value]
  parts += [f"manual_dir={_MANUAL_DIR.value}"] if _MANUAL_DIR.value else []
  parts += [f"data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []
  return ",".join(p for p in parts if p)


def run_row(batch, loss, seed):
  """The row's results.json, metrics.jsonl lines and wall seconds (None when read from an earlier run)."""
  workdir = pathlib.Path(_WORKDIR.value) / f"{_DATASET.value}_b{batch}_{loss}_s{seed}"
  wall = None
  if not (workdir / "results.json").exists():
    command = [sys.executable, "-m", "rsalign_jax.main",
               f"--config=configs/frozen_trunks.py:{config_arg(batch, loss, seed)}", f"--workdir={workdir}"]
    print(" ".join(command), file=sys.stderr, flush=True)
    start = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
      subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - start
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return json.loads((workdir / "results.json").read_text()), lines, wall


def summary(results, lines, wall):
  windows = [line["perf/seconds_per_step"] for line in lines if "perf/seconds_per_step" in line]
  memory = [line["perf/step_memory_mib"] for line in lines if "perf/step_memory_mib" in line]
  return {"val": results["best_val"]["mR"], "test": results["test"]["mR"], "steps": results["total_steps"],
          "s_per_step": statistics.median(windows[1:] or windows), "with_compile": len(windows) == 1,
          "memory": memory[0] if memory else float("nan"), "wall": wall}


def mean_text(values, digits=2):
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv):
  del argv
  print("| batch | loss | steps | val mR | test mR | s/step | step memory / device (MiB) | wall |\n"
        "|---:|---|---:|---:|---:|---:|---:|---|")
  for batch in _BATCHES.value:
    for loss in _LOSSES.value:
      rows = [summary(*run_row(int(batch), loss, int(seed))) for seed in _SEEDS.value]
      walls = [r["wall"] for r in rows if r["wall"] is not None]
      wall = f"{statistics.mean(walls) / 60:.1f} min" if walls else "(earlier run)"
      print(f"| {batch} | {loss} | {rows[0]['steps']} | {mean_text([r['val'] for r in rows])} | "
            f"{mean_text([r['test'] for r in rows])} | {statistics.median(r['s_per_step'] for r in rows):.3f}"
            f"{'*' if rows[0]['with_compile'] else ''} | "
            f"{rows[0]['memory']:.0f} | {wall} |", flush=True)


if __name__ == "__main__":
  app.run(main)
