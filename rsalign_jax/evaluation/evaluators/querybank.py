"""The papers' retrieval metrics of a split with querybank normalisation (`evaluation.querybank`), reported beside the
plain `retrieval` evaluator's.

The banks come from `bank_split` (the training split by default): its distinct captions are the bank of text
queries (normalising the t2i scores of every test image) and its images the bank of image queries (normalising the
i2t scores of every test caption). The test queries' own statistics are never used.

  config.evals.test_qbnorm = dict(type="querybank", split="test", at="end", beta=10.0)
"""
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.evaluation import querybank
from rsalign_jax.evaluation.evaluators import retrieval


class Evaluator:
  """`split`'s retrieval metrics from scores normalised against the banks (`dynamic`: QB-Norm's dynamic inverted
  softmax; otherwise the inverted softmax for every query), inverse temperature `beta`."""

  def __init__(self, setup, name, *, split, bank_split="", beta=10.0, dynamic=True):
    if bank_split == split:
      raise ValueError(f"evals.{name}.bank_split={bank_split!r}: the query bank must come from another split than "
                       "the one evaluated (its queries' own statistics would leak into their scores)")
    self.name, self._retrieval = name, setup.retrieval
    self._evaluator = setup.make_evaluator(split)
    self._bank = setup.make_evaluator(bank_split or setup.config.dataset.train_split)
    self._beta, self._dynamic = beta, dynamic

  @property
  def beta(self):
    return self._beta

  def run(self, variables, step, writer):
    del writer  # `evaluators.run` writes the metrics
    metrics = self.normalised_metrics(*self.bank_scores(variables))
    retrieval.log("%s @%d: %s", self.name, step, ", ".join(f"{k} {metrics[k]:.2f}" for k in retrieval.SUMMARY))
    return metrics

  def bank_scores(self, variables):
    """(split images x distinct captions, split images x bank captions, bank images x distinct captions) scores."""
    evaluator, r = self._evaluator, self._retrieval
    images, texts = evaluator.embeddings(variables, r.embed_images, r.embed_texts)
    bank_images, bank_texts = self._bank.embeddings(variables, r.embed_images, r.embed_texts)
    return (evaluator.scores(variables, r.score, images, texts),
            evaluator.scores(variables, r.score, images, bank_texts, "scoring the caption bank"),
            evaluator.scores(variables, r.score, bank_images, texts, "scoring the image bank"))

  def release_inputs(self):
    """Frees the split's and the banks' images (`RetrievalEvaluator.release_inputs`)."""
    self._evaluator.release_inputs()
    self._bank.release_inputs()

  def aligned(self, other, scores):
    """`other`'s `bank_scores` (another model's, on the same split and bank) with their columns in this evaluator's
    caption order, so that the two models' scores can be added."""
    split_columns = self._evaluator.distinct_columns_of(other._evaluator)
    sim, text_bank, image_bank = scores
    return sim[:, split_columns], text_bank[:, self._bank.distinct_columns_of(other._bank)], image_bank[:, split_columns]

  def normalised_metrics(self, sim, text_bank, image_bank):
    """The split's retrieval metrics from `bank_scores`' three matrices (of one model, or an ensemble's means)."""
    i2t = querybank.normalise(sim, image_bank, self._beta, self._dynamic)
    t2i = querybank.normalise(sim.T, text_bank.T, self._beta, self._dynamic).T
    return metrics_lib.retrieval_metrics(self._evaluator.caption_columns(i2t), self._evaluator.index.record,
                                         t2i_sim=self._evaluator.caption_columns(t2i))
