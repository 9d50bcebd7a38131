"""HVSA's losses against small numpy references, value and gradient (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.losses import hvsa, similarity, triplet, uniformity


def numpy_difficulty_weighted(scores, margin, beta):
  n = scores.shape[0]
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      for cost in (max(0.0, margin + scores[i, j] - scores[i, i]), max(0.0, margin + scores[i, j] - scores[j, j])):
        total += cost * np.exp(-beta * cost)
  return total / n**2


def numpy_difficulty_weighted_grad(scores, margin, beta):
  """d loss / d S: each violated pair adds exp(-bc)(1-bc) to S_ij and subtracts it from its positive."""
  n = scores.shape[0]
  grad = np.zeros_like(scores)
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      for anchor in (i, j):
        cost = margin + scores[i, j] - scores[anchor, anchor]
        if cost > 0:
          g = np.exp(-beta * cost) * (1 - beta * cost) / n**2
          grad[i, j] += g
          grad[anchor, anchor] -= g
  return grad


def numpy_uniformity(x, gamma, form):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  pairs = [np.exp(-gamma * np.sum((x[p] - x[q]) ** 2)) for p in range(len(x)) for q in range(p + 1, len(x))]
  mean = np.mean(pairs)
  return np.log(mean) if form == "log" else mean


def numeric_grad(f, x, eps=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = eps
    grad[idx] = (f(x + step) - f(x - step)) / (2 * eps)
  return grad


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_difficulty_weighted_triplet_value_and_grad(x64):
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, (6, 6))
  value, grad = jax.value_and_grad(
      lambda s: triplet.difficulty_weighted_triplet(s.astype(jnp.float64), margin=0.2, beta=0.5))(scores)
  np.testing.assert_allclose(value, numpy_difficulty_weighted(scores, 0.2, 0.5), rtol=1e-12)
  np.testing.assert_allclose(grad, numpy_difficulty_weighted_grad(scores, 0.2, 0.5), atol=1e-12)


def test_difficulty_weighted_triplet_is_zero_when_margin_is_respected():
  scores = np.full((4, 4), -0.5) + np.eye(4) * 1.5  # positives 1.0, negatives -0.5: violation margin - 1.5 < 0
  assert float(triplet.difficulty_weighted_triplet(scores, margin=0.2, beta=0.5)) == 0.0


@pytest.mark.parametrize("form", ["exp_mean", "log"])
def test_feature_uniformity_value_and_grad(x64, form):
  x = np.random.default_rng(1).normal(size=(5, 3))
  value, grad = jax.value_and_grad(lambda v: uniformity.feature_uniformity(v, gamma=2.0, form=form))(x)
  np.testing.assert_allclose(value, numpy_uniformity(x, 2.0, form), rtol=1e-12)
  np.testing.assert_allclose(grad, numeric_grad(lambda v: numpy_uniformity(v, 2.0, form), x), atol=1e-8)


def test_feature_uniformity_rejects_single_row_and_unknown_form():
  with pytest.raises(ValueError, match="at least 2 rows"):
    uniformity.feature_uniformity(np.ones((1, 3)))
  with pytest.raises(ValueError, match="expected one of"):
    uniformity.feature_uniformity(np.ones((3, 3)), form="sqrt")


def test_cosine_similarity_matches_numpy(x64):
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
  expected = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
  np.testing.assert_allclose(similarity.cosine_similarity(a, b), expected, rtol=1e-12)
  assert np.all(np.asarray(similarity.cosine_similarity(np.zeros((2, 6)), b)) == 0.0)


def test_hvsa_objective_combines_losses_with_learned_softmax_weights(x64):
  rng = np.random.default_rng(3)
  outputs = {"image_embedding": rng.normal(size=(10, 8)), "text_embedding": rng.normal(size=(10, 8))}
  objective = hvsa.Objective()
  params = objective.init(jax.random.key(0), outputs, None)
  total, aux = objective.apply(params, outputs, None)
  scores = similarity.cosine_similarity(outputs["image_embedding"], outputs["text_embedding"])
  np.testing.assert_allclose(aux["align"], numpy_difficulty_weighted(np.asarray(scores), 0.2, 0.5), rtol=1e-10)
  np.testing.assert_allclose(aux["uniformity"], numpy_uniformity(outputs["image_embedding"][::5], 2.0, "exp_mean"),
                             rtol=1e-10)
  np.testing.assert_allclose(aux["weight_align"] + aux["weight_uniformity"], 1.0, rtol=1e-12)
  np.testing.assert_allclose(total, aux["weight_align"] * aux["align"] + aux["weight_uniformity"] * aux["uniformity"],
                             rtol=1e-12)
  grads = jax.grad(lambda p: objective.apply(p, outputs, None)[0])(params)
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads)), "the weighting MLP must be trained by the loss"
