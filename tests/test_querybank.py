"""Querybank normalisation (`evaluation.querybank`) against a loop-by-loop numpy reference, what it does to a hub,
and the evaluator entry that reports it beside the plain metrics."""
import math

import jax
import numpy as np
import pytest

from rsalign_jax.evaluation import evaluators, metrics, querybank, schedule
from rsalign_jax.modes import trained as trained_lib


def reference(scores, bank_scores, beta, dynamic):
  """The paper's definitions, one query and one gallery item at a time: IS(q, g) = exp(beta s(q, g)) /
  sum_b exp(beta s(b, g)); with `dynamic`, only for queries whose best match is some bank query's best match."""
  num_queries, num_gallery = scores.shape
  activation = {max(range(num_gallery), key=lambda g: row[g]) for row in bank_scores}
  out = np.empty((num_queries, num_gallery))
  for q in range(num_queries):
    best = max(range(num_gallery), key=lambda g: scores[q, g])
    for g in range(num_gallery):
      inverted = math.exp(beta * scores[q, g]) / sum(math.exp(beta * b[g]) for b in bank_scores)
      out[q, g] = math.log(inverted) if (best in activation or not dynamic) else scores[q, g]
  return out


@pytest.mark.parametrize("dynamic", [True, False])
def test_normalise_equals_the_reference(dynamic):
  rng = np.random.default_rng(0)
  scores, bank_scores = rng.uniform(-1, 1, (7, 5)), rng.uniform(-1, 1, (11, 5))
  np.testing.assert_allclose(querybank.normalise(scores, bank_scores, 20.0, dynamic),
                             reference(scores, bank_scores, 20.0, dynamic), rtol=1e-12, atol=1e-12)


def test_a_hub_loses_the_queries_it_stole():
  """Gallery item 0 is a little closer than the right item to every query (and to every bank query): raw scores give
  it every query, normalised ones give each query its own item."""
  own = 0.75 * np.eye(3) + 0.1 * (1 - np.eye(3))
  scores = np.concatenate([np.full((3, 1), 0.8), own], axis=1)  # queries x (hub, a, b, c)
  bank_scores = np.repeat(scores, 2, axis=0)  # two bank queries like each test query
  assert np.argmax(scores, 1).tolist() == [0, 0, 0]
  assert np.argmax(querybank.normalise(scores, bank_scores, 20.0), 1).tolist() == [1, 2, 3]


def test_queries_whose_best_match_no_bank_query_prefers_keep_their_scores():
  scores = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
  bank_scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.1, 0.3]])  # activation set {0}
  out = querybank.normalise(scores, bank_scores, 10.0)
  np.testing.assert_array_equal(out[1], scores[1])
  assert not np.allclose(out[0], scores[0])


@pytest.mark.parametrize("args, message", [
    ((np.zeros((2, 3)), np.zeros((4, 2)), 1.0), r"query scores \(2, 3\) and bank scores \(4, 2\): expected"),
    ((np.zeros((2, 3)), np.zeros((4, 3)), 0.0), "querybank beta=0.0: expected a positive inverse temperature"),
])
def test_mistakes(args, message):
  with pytest.raises(ValueError, match=message):
    querybank.normalise(*args)


def test_metrics_take_each_direction_from_its_own_matrix():
  rng = np.random.default_rng(2)
  caption_image = np.repeat(np.arange(6), 2)
  i2t_sim, t2i_sim = rng.normal(size=(6, 12)), rng.normal(size=(6, 12))
  both = metrics.retrieval_metrics(i2t_sim, caption_image, t2i_sim=t2i_sim)
  i2t, t2i = metrics.retrieval_metrics(i2t_sim, caption_image), metrics.retrieval_metrics(t2i_sim, caption_image)
  assert {k: v for k, v in both.items() if k.startswith("i2t")} == {k: v for k, v in i2t.items() if k.startswith("i2t")}
  assert {k: v for k, v in both.items() if k.startswith("t2i")} == {k: v for k, v in t2i.items() if k.startswith("t2i")}
  recalls = [both[f"{d}_R{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
  assert both["rsum"] == pytest.approx(sum(recalls)) and both["mR"] == pytest.approx(np.mean(recalls))


def test_the_entry_reports_the_metrics_of_the_normalised_cosines(hvsa_run):
  """The `querybank` evaluator of a trained HVSA (cosine scores) equals the reference above applied to its
  embeddings, with the training split as both banks; the same cosines unnormalised give the trainer's test row."""
  config, workdir, results = hvsa_run
  loaded = trained_lib.load(config, str(workdir))
  setup, variables = loaded.setup, loaded.variables
  entries = schedule.parse({"qb": dict(type="querybank", split="test", at="end", beta=20.0)}, 10)
  with jax.set_mesh(setup.mesh):
    got = evaluators.build(setup, entries)["qb"].run(variables, 0, None)
    test, bank = setup.make_evaluator("test"), setup.make_evaluator(config.dataset.train_split)
    images, texts = test.embeddings(variables, setup.retrieval.embed_images, setup.retrieval.embed_texts)
    bank_images, bank_texts = bank.embeddings(variables, setup.retrieval.embed_images, setup.retrieval.embed_texts)
  assert setup.model.SCORE == "cosine"
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  cosines = lambda a, b: unit(np.asarray(a, np.float64)) @ unit(np.asarray(b, np.float64)).T
  sim = cosines(images, texts)
  plain = metrics.retrieval_metrics(test.caption_columns(sim), test.index.record)
  assert plain == pytest.approx(results["test"], abs=1e-6)
  i2t = reference(sim, cosines(bank_images, texts), 20.0, dynamic=True)
  t2i = reference(sim.T, cosines(bank_texts, images), 20.0, dynamic=True).T
  want = metrics.retrieval_metrics(test.caption_columns(i2t), test.index.record, t2i_sim=test.caption_columns(t2i))
  assert got == pytest.approx(want, abs=1e-6)
  assert got != pytest.approx(plain, abs=1e-6)


def test_a_bank_from_the_evaluated_split_is_refused():
  entries = schedule.parse({"qb": dict(type="querybank", split="test", bank_split="test", at="end")}, 10)
  with pytest.raises(ValueError, match=r"^evals.qb.bank_split='test': the query bank must come from another split"):
    evaluators.build(None, entries)
