"""What produced a run, for its results.json: the source commit and the versions of the packages that compute."""
import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain", "tensorflow-datasets")


def git_commit():
  """The commit of the checkout this package runs from, with '+dirty' if it has uncommitted changes; None outside a
  git checkout (an installed wheel)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if changed else "")


def versions():
  """{package: version} of the computing stack and Python (None for a package that is not installed)."""
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  return {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}}
