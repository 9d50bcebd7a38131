"""The gallery picture of a split (`serving.gallery.split_picture`): `queries` of its captions (the first captions of
evenly spaced images), each with its top-`k` images and the ground truth outlined, to TensorBoard as `<name>/picture`.
"""
import numpy as np

from rsalign_jax.serving import gallery


class Evaluator:
  """Draws the picture at each run; reports no metrics."""

  def __init__(self, setup, name, *, split, queries=4, k=5):
    if queries < 1:
      raise ValueError(f"evals.{name}.queries={queries}: expected >= 1 (evals.{name}.enabled=False turns it off)")
    self._setup, self._tag, self._queries, self._k = setup, f"{name}/picture", queries, k
    self._data = setup.split(split)

  def run(self, variables, step, writer):
    picture, _ = gallery.split_picture(self._setup, variables, self._data, num_queries=self._queries, k=self._k)
    writer.image(step, self._tag, np.asarray(picture))
    return None
