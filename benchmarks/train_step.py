"""Train-step throughput of a method's config on this machine, on random inputs (no input pipeline).

  python benchmarks/train_step.py --config=hvsa --sizes=64,80,96 --widths=16,32

Prints seconds per step and images/s for each (image size, ResNet width) at the config's batch size, so CPU-size
configs can be chosen from measurements (e.g. XLA:CPU is pathologically slow on 3x3 convs over 2x2 maps, which is
why the default synthetic run uses 80 px: 64 px leaves a 2x2 last stage).
"""
import jax
from absl import app
from absl import flags

import timing

_CONFIG = flags.DEFINE_string("config", "hvsa", "Method config: configs/<name>.py, optionally name:arg.")
_SIZES = flags.DEFINE_list("sizes", ["80"], "Image sizes to time.")
_WIDTHS = flags.DEFINE_list("widths", [], "ResNet widths to time (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")


def main(argv):
  del argv
  name, _, arg = _CONFIG.value.partition(":")
  config = timing.load_config(name, arg or None)
  widths = [int(w) for w in _WIDTHS.value] or [config.model.resnet_width]
  print(f"{config.model_name}, global batch {config.input.batch_size}, {jax.device_count()} {jax.devices()[0].platform}"
        " device(s)\n")
  print("| image px | ResNet width | compile+1st step s | s/step | images/s |\n|---:|---:|---:|---:|---:|")
  for size in (int(s) for s in _SIZES.value):
    for width in widths:
      config.model.resnet_width = width
      r = timing.time_train_step(config, size, _STEPS.value)
      print(f"| {size} | {width} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} | {r['images_per_s']:.0f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
