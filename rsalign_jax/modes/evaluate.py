"""`--mode=eval`: the papers' retrieval table of a trained workdir.

Evaluation recomputes exactly what the trainer reports: the same evaluator (`Setup.make_evaluator`), the same jitted
towers and the same checkpoint choice (best val if `config.test_on_best` and a best checkpoint exists, else the
last), so its numbers equal `results.json`'s test numbers. Several seeds: `rsalign_jax.modes.seeds`.
"""
import json
import os

import jax

from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.modes import trained as trained_lib

def evaluate(config, workdir, *, checkpoint="", split=""):
  """Evaluates a checkpoint of `workdir` on `split` (default: the test split); prints and writes the table.

  Writes WORKDIR/eval_<split>.json ({split, dataset, checkpoint, step, metrics, table}) and .md. Returns the dict.
  """
  loaded = trained_lib.load(config, workdir, checkpoint)
  split = split or config.dataset.test_split
  with jax.set_mesh(loaded.setup.mesh):
    evaluator = loaded.setup.make_evaluator(split)
    metrics = loaded.setup.retrieval.evaluate(evaluator, loaded.variables)
  title = f"{config.dataset.name} {split}"
  table = metrics_lib.format_table({f"{config.model_name} ({loaded.checkpoint})": metrics}, title=title)
  result = {"split": split, "dataset": config.dataset.name, "model": config.model_name,
            "checkpoint": loaded.checkpoint, "step": loaded.step, "images": evaluator.num_images,
            "metrics": metrics, "table": table}
  write_report(workdir, f"eval_{split}", result, table)
  return result


def write_report(workdir, name, result, table):
  """WORKDIR/<name>.json and .md (process 0 only), and the table printed."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
