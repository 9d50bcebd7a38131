"""The papers' text-image retrieval metrics of a split (i2t/t2i R@K, mR, rsum; `evaluation.evaluator`), computed
as `--mode=eval` computes them."""
from rsalign_jax.runtime import metric_writer

log = metric_writer.log
SUMMARY = ("i2t_R1", "i2t_R10", "t2i_R1", "t2i_R10", "mR")


class Evaluator:
  """`split`'s retrieval metrics with the run's jitted towers; the evaluators of a split share its decoded images."""

  def __init__(self, setup, name, *, split):
    self.name, self._retrieval = name, setup.retrieval
    self._evaluator = setup.make_evaluator(split)

  def run(self, variables, step, writer):
    del writer  # `evaluators.run` writes the metrics
    metrics = self._retrieval.evaluate(self._evaluator, variables)
    log("%s @%d: %s", self.name, step, ", ".join(f"{k} {metrics[k]:.2f}" for k in SUMMARY))
    return metrics
