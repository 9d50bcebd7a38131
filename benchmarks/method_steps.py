"""Train-step throughput of every method's default config (each `configs/*.py` there is), on random inputs.

  python benchmarks/method_steps.py [--steps=5] [--configs=hvsa,clip] [--arg=rsicd,image_size=150,...]

For each config's default (CPU-size, synthetic benchmark) setting, or the setting `--arg` names, jits
`train.train_step` at the config's global batch and image size on a batch with every field the method takes (`timing.time_train_step`) and prints a markdown
table of seconds per step, images/s and XLA's per-device temporary memory. A config that fails to build or compile
gets its error in the table instead of stopping the others.
"""
import jax
from absl import app
from absl import flags

import timing

_CONFIGS = flags.DEFINE_list("configs", [], "Config names (default: every configs/*.py).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_ARG = flags.DEFINE_string("arg", None, "The `get_config(arg)` string given to every config (default: none).")


def main(argv):
  del argv
  names = _CONFIGS.value or sorted(p.stem for p in timing.CONFIGS.glob("*.py"))
  devices = jax.devices()
  print(f"{len(devices)} {devices[0].platform} device(s); default config of each method, random inputs\n")
  print("| config | model / loss | global batch | image px | fields | compile+1st step s | s/step | images/s | "
        "temp MiB / device |")
  print("|---|---|---:|---:|---|---:|---:|---:|---:|")
  for name in names:
    try:
      config = timing.load_config(name, _ARG.value)
      size = config.dataset.image_size
      r = timing.time_train_step(config, size, _STEPS.value)
    except Exception as e:  # pylint: disable=broad-except  (one broken config must not hide the others' numbers)
      print(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | | | |", flush=True)
      continue
    print(f"| {name} | {config.model_name} / {config.loss_name} | {config.input.batch_size} | {size} | "
          f"{', '.join(r['fields']) or '-'} | "
          f"{r['compile_s']:.1f} | {r['s_per_step']:.3f} | {r['images_per_s']:.0f} | {r['temp_mib']:.0f} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
