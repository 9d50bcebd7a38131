"""Command line entry point: `python -m rsalign_jax.main --config=configs/hvsa.py[:arg] --workdir=DIR [--mode=...]`.

Intentionally thin (as in the flax examples): flags, then an importable, tested function per mode:
  train   `train.train_and_evaluate` (the default);
  eval    the papers' retrieval table of the checkpoint the trainer tests (`modes.evaluate`);
  export  a split's image and caption embeddings with their ids (`modes.export`);
  search  free text -> top-k images, image file -> top-k captions or images (`modes.search`);
  zeroshot  scene classification from class-name prompts, top-1/top-5 accuracy (`modes.zeroshot`).
With `--config.seeds=0,1,2`, train and eval run every seed in WORKDIR/seed_<n> and report mean +- std (`modes.seeds`);
`--ensemble` adds the seeds' models evaluated as one ensemble (`modes.ensemble`); `--mode=eval --ensemble
--members=W1,W2` ensembles trained workdirs of any configs (seeds workdirs: one ensemble per seed, mean +- std).
Training saves the resolved config as WORKDIR/config.json; eval, export, search and zeroshot without --config use it.
Multi-process jobs join the distributed system first (`runtime.distributed`), before any other JAX call.
"""
import difflib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rsalign_jax import configlib, train
from rsalign_jax.modes import ensemble, evaluate, export, search, seeds as seeds_lib, zeroshot
from rsalign_jax.runtime import distributed
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally `file.py:arg`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "search", "zeroshot"],
                          "What to do (see the docstring).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "eval/export/search/zeroshot: '' (the one the trainer tests: best val if config.test_on_best, "
    "else the last), 'best', 'last', or a checkpoint directory or step directory, e.g. WORKDIR/checkpoints/400; "
    "zeroshot also 'init': the untrained model as config.init initialises it (imported weights, or random).")
_SPLIT = flags.DEFINE_string("split", "", "eval/export/search gallery/zeroshot: dataset split (default: the test "
                             "split).")
_ENSEMBLE = flags.DEFINE_bool(
    "ensemble", False, "eval with --config.seeds: also the seeds' models as one ensemble, ranked by the mean of their "
    "scores (modes.ensemble), written to WORKDIR/ensemble_<split>.json; with --members: those workdirs' models.")
_MEMBERS = flags.DEFINE_list(
    "members", [], "eval --ensemble: trained workdirs to ensemble, each restored with its saved config (e.g. runs "
    "at two input sizes); seeds workdirs (runs in seed_<n>) give one ensemble per seed and their mean ± std. "
    "Needs no --config.")
_EVAL_VIEWS = flags.DEFINE_integer(
    "eval_views", 0, "eval: score each image as the mean over its first N dihedral views (test-time augmentation), "
    "in place of config.eval_views (of --config, the workdir's saved config or each --members run's); 0: as saved.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "export: output directory (default WORKDIR/export_<split>).")
_QUERY = flags.DEFINE_multi_string("query", [], "search: a free-text query (repeatable); ranks gallery images.")
_IMAGE = flags.DEFINE_multi_string("image", [], "search: an image file (repeatable); ranks --targets.")
_SAMPLE_QUERIES = flags.DEFINE_integer(
    "sample_queries", 0, "search: also query with the first captions of this many evenly spaced gallery images.")
_K = flags.DEFINE_integer("k", 5, "search: results per query.")
_GALLERY = flags.DEFINE_string("gallery", "", "search: an export directory (default: embed --split now).")
_CODES = flags.DEFINE_enum("codes", "float", search.CODES,
                           "search: rank by the model's score of float embeddings, or by Hamming distance of hash "
                           "codes (models with image_codes/text_codes, e.g. CCLS2T).")
_TARGETS = flags.DEFINE_enum("targets", "captions", search.TARGETS, "search: what image queries rank.")
_PNG = flags.DEFINE_string("png", "", "search: write the gallery picture of the image results to this PNG.")
_ZEROSHOT_TEMPLATES = flags.DEFINE_string(
    "zeroshot_templates", "", "zeroshot: a file of prompt templates, one per line with '{}' for the class name "
    "(default: 'a satellite photo of {}.' and a few more, modes.zeroshot.DEFAULT_TEMPLATES).")
_ZEROSHOT_CLASSNAMES = flags.DEFINE_string(
    "zeroshot_classnames", "", "zeroshot: a file of class names, one per line in the order of the dataset's scene "
    "classes (default: those names, underscores as spaces).")
_OUTPUT = flags.DEFINE_string("output", "", "search: write the results as JSON to this file.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "auto: join a multi-process job when the flags below are given or SLURM / Cloud TPU is detected; on: always "
    "(JAX auto-detects what the flags leave out); off: single process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, e.g. 127.0.0.1:12345.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, mode=_DISTRIBUTED.value)
  metric_writer.quiet_library_info_logs()
  try:
    if _MEMBERS.value:
      _ensemble_members()
    else:
      _run(_with_eval_views(_config()), _WORKDIR.value, _MODE.value)
  except USER_ERRORS as e:
    logging.debug("where the error was raised", exc_info=True)
    sys.exit(f"error: {e}")


# What input mistakes raise, each with a message naming the flag, field or file and what was expected: reported in
# that one line (`--verbosity=1` also logs the traceback).
USER_ERRORS = (workdir_lock.WorkdirBusyError, FileNotFoundError, ValueError)


def _config():
  """--config with its overrides; without it, eval/export/search/zeroshot read the workdir's saved config."""
  if _CONFIG.value is not None:
    return _CONFIG.value
  if _MODE.value == "train":
    raise app.UsageError("--config is required to train, e.g. --config=configs/hvsa.py")
  return configlib.load_resolved(_WORKDIR.value)


def _ensemble_members():
  if not (_MODE.value == "eval" and _ENSEMBLE.value) or _CONFIG.value is not None:
    raise app.UsageError("--members names the workdirs of an ensemble: use it with --mode=eval --ensemble and no "
                         "--config (each member's saved config is used)")
  ensemble.evaluate_members(_MEMBERS.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, split=_SPLIT.value,
                            configure=_with_eval_views)


def _with_eval_views(config):
  """`config` with --eval_views in place of its eval_views (0: as it is)."""
  if not _EVAL_VIEWS.value:
    return config
  if _MODE.value != "eval":
    raise app.UsageError(f"--eval_views is an evaluation option: use it with --mode=eval, not --mode={_MODE.value} "
                         "(to train with it, set --config.eval_views)")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval_views = _EVAL_VIEWS.value
  return config


def _run(config, workdir, mode):
  seeds = tuple(config.get("seeds", ()))
  if _ENSEMBLE.value and not (mode == "eval" and seeds):
    raise app.UsageError("--ensemble evaluates the models of several seeds: use it with --mode=eval and "
                         "--config.seeds=0,1,2 (their runs in WORKDIR/seed_<n>)")
  if mode == "train" and seeds:
    seeds_lib.train_seeds(config, workdir, seeds)
  elif mode == "train":
    train.train_and_evaluate(config, workdir)
  elif mode == "eval" and seeds:
    seeds_lib.evaluate_seeds(config, workdir, seeds, checkpoint=_CHECKPOINT.value, split=_SPLIT.value)
    if _ENSEMBLE.value:
      members = [(seeds_lib.seed_config(config, s), seeds_lib.seed_workdir(workdir, s)) for s in seeds]
      ensemble.evaluate_ensemble(members, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value)
  elif mode == "eval":
    evaluate.evaluate(config, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value)
  elif mode == "export":
    export.export(config, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value, output_dir=_OUTPUT_DIR.value)
  elif mode == "zeroshot":
    zeroshot.zeroshot(config, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value,
                      templates_file=_ZEROSHOT_TEMPLATES.value, classnames_file=_ZEROSHOT_CLASSNAMES.value)
  else:
    search.run(config, workdir, queries=_QUERY.value, image_paths=_IMAGE.value, sample_queries=_SAMPLE_QUERIES.value,
               k=_K.value, checkpoint=_CHECKPOINT.value, gallery_dir=_GALLERY.value, split=_SPLIT.value,
               codes=_CODES.value, targets=_TARGETS.value, png=_PNG.value, output=_OUTPUT.value)


def parse_flags(argv):
  """absl's flag parsing, with mistakes in --config and its overrides reported in one line (`error: ...`) instead of
  a traceback: an unknown field gets the closest valid names, a value of the wrong type the expected type."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names a field the config does not have
    sys.exit(f"error: {_unknown_field(argv) or e}")
  except flags.Error as e:
    sys.exit(f"error: {_one_line(str(e))}")


_EXPECTED = {"invalid literal for int()": "expected an integer",
             "could not convert string to float": "expected a number"}


def _one_line(message):
  """A flags error in one line: a config file's own exception without the traceback absl wraps it in."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  head = lines[0].split(": Error whilst parsing config file")[0]
  text = head if len(lines) == 1 else f"{head}: {re.sub(r'^[A-Za-z]*(Error|Exception): ', '', lines[-1])}"
  hints = [hint for pattern, hint in _EXPECTED.items() if pattern in text]
  return text + (f" ({hints[0]})" if hints else "")


def _unknown_field(argv):
  """'--config.a.b=v: config.a has no field 'b' (closest: ...)' for the first override naming a missing field."""
  given = [arg[len("--config="):] for arg in argv if arg.startswith("--config=")]
  if not given:
    return None
  path, _, arg = given[-1].partition(":")
  try:
    module = configlib.load_module(path)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  (the message falls back to ml_collections' own)
    return None
  for override in (arg[len("--config."):].split("=")[0] for arg in argv if arg.startswith("--config.")):
    node, parents = config, ["config"]
    for name in override.split("."):
      if not hasattr(node, "keys") or name not in node:
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
        guess = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"--config.{override}: {'.'.join(parents)} has no field {name!r}{guess}; its fields: {', '.join(fields)}"
      node = node[name]
      parents.append(name)
  return None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
