"""The losses against small numpy references, value and gradient (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax import similarity
from rsalign_jax.losses import contrastive, hashing, hvsa, labels, sigmoid, triplet, uniformity


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
  np.testing.assert_allclose(similarity.unit_cosine_similarity(a, b), expected, rtol=1e-12)
  np.testing.assert_allclose(similarity.paired_unit_cosine_similarity(a[:3], b), np.diag(expected), rtol=1e-12)
  for cosine in (similarity.cosine_similarity, similarity.unit_cosine_similarity):
    assert np.all(np.asarray(cosine(np.zeros((2, 6)), b)) == 0.0)


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


# ---- the retrieval losses of contrastive, sigmoid, triplet, labels, hashing: numpy references ----

def numpy_cosine(a, b):
  return a @ b.T / np.maximum(np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)), 1e-8)


def numpy_logsumexp(x):
  return x.max() + np.log(np.sum(np.exp(x - x.max())))


def numpy_softmax(images, texts, ids, log_scale):
  logits = np.exp(log_scale) * numpy_cosine(images, texts)
  total = 0.0
  for i in range(len(ids)):
    positives = ids == ids[i]
    total -= np.mean(logits[i, positives] - numpy_logsumexp(logits[i]))  # image i -> captions of its image
    total -= np.mean(logits[positives, i] - numpy_logsumexp(logits[:, i]))  # caption i -> its image's copies
  return total / (2 * len(ids))


def numpy_sigmoid(images, texts, ids, log_scale, bias):
  logits = np.exp(log_scale) * numpy_cosine(images, texts) + bias
  signs = np.where(ids[:, None] == ids[None, :], 1.0, -1.0)
  return np.sum(np.logaddexp(0.0, -signs * logits)) / len(ids)


def numpy_hinge(images, texts, ids, margins, hardest, penalty=lambda c: c):
  s = numpy_cosine(images, texts)
  n, total = len(ids), 0.0
  for anchor in range(n):
    negatives = [k for k in range(n) if ids[k] != ids[anchor]]
    for costs in ([penalty(max(0.0, margins[anchor, j] + s[anchor, j] - s[anchor, anchor])) for j in negatives],
                  [penalty(max(0.0, margins[i, anchor] + s[i, anchor] - s[anchor, anchor])) for i in negatives]):
      total += max(costs, default=0.0) if hardest else sum(costs)
  return total


def check_value_and_grads(jax_loss, numpy_loss, args, rtol=1e-10, atol=1e-7):
  """jax_loss(*args) against numpy_loss(*args): value, and gradient in every argument by finite differences."""
  value, grads = jax.value_and_grad(jax_loss, argnums=tuple(range(len(args))))(*args)
  np.testing.assert_allclose(value, numpy_loss(*args), rtol=rtol)
  for k, (arg, grad) in enumerate(zip(args, grads)):
    def along_k(x, k=k):
      return numpy_loss(*args[:k], x, *args[k + 1:])
    np.testing.assert_allclose(grad, numeric_grad(along_k, np.asarray(arg, np.float64)), atol=atol)


def embeddings(seed, n=6, d=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(n, d))


DUPLICATE_IDS = np.array([0, 1, 1, 2, 3, 3])


@pytest.mark.parametrize("ids", [None, DUPLICATE_IDS])
def test_softmax_loss_multi_positive(x64, ids):
  images, texts = embeddings(10)
  np_ids = np.arange(6) if ids is None else ids
  check_value_and_grads(lambda x, y, t: contrastive.softmax_loss(x, y, ids, log_scale=t),
                        lambda x, y, t: numpy_softmax(x, y, np_ids, t), [images, texts, np.float64(1.5)])


def test_softmax_loss_with_distinct_ids_is_clip(x64):
  images, texts = embeddings(11)
  logits = np.exp(2.0) * numpy_cosine(images, texts)
  log_probs_rows = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  log_probs_cols = logits - np.log(np.sum(np.exp(logits), axis=0, keepdims=True))
  clip = -0.5 * (np.mean(np.diag(log_probs_rows)) + np.mean(np.diag(log_probs_cols)))
  np.testing.assert_allclose(contrastive.softmax_loss(images, texts, log_scale=2.0), clip, rtol=1e-12)


def test_sigmoid_loss(x64):
  images, texts = embeddings(12)
  check_value_and_grads(lambda x, y, t, b: sigmoid.sigmoid_loss(x, y, DUPLICATE_IDS, log_scale=t, bias=b),
                        lambda x, y, t, b: numpy_sigmoid(x, y, DUPLICATE_IDS, t, b),
                        [images, texts, np.float64(np.log(10.0)), np.float64(-3.0)])


@pytest.mark.parametrize("negatives", ["sum", "hardest"])
def test_vse_loss_masks_same_id_pairs(x64, negatives):
  images, texts = embeddings(13)
  margins = np.full((6, 6), 0.3)
  check_value_and_grads(lambda x, y: triplet.vse_loss(x, y, DUPLICATE_IDS, margin=0.3, negatives=negatives),
                        lambda x, y: numpy_hinge(x, y, DUPLICATE_IDS, margins, negatives == "hardest"),
                        [images, texts])


def test_difficulty_weighted_loss_is_hvsa_on_cosine_scores(x64):
  images, texts = embeddings(14)
  scores = numpy_cosine(images, texts)
  np.testing.assert_allclose(triplet.difficulty_weighted_loss(images, texts, margin=0.2, beta=0.5),
                             numpy_difficulty_weighted(scores, 0.2, 0.5), rtol=1e-12)
  np.testing.assert_allclose(triplet.difficulty_weighted_loss(images, texts),
                             triplet.difficulty_weighted_triplet(scores), rtol=1e-12)


def test_dynamic_margin_endpoints_and_loss(x64):
  np.testing.assert_allclose(triplet.dynamic_margin(np.array([0.0, 1.0]), gamma=0.6, beta=5.0), [0.6, 0.0],
                             atol=1e-15)
  prior = np.random.default_rng(15).uniform(size=(6, 6))
  margins = 0.6 * (np.exp(5.0) - np.exp(5.0 * prior)) / (np.exp(5.0) - 1.0)
  images, texts = embeddings(15)
  check_value_and_grads(lambda x, y: triplet.dynamic_margin_loss(x, y, prior, DUPLICATE_IDS),
                        lambda x, y: numpy_hinge(x, y, DUPLICATE_IDS, margins, hardest=False), [images, texts])


def test_semantic_guided_triplet_shrinks_the_margin_of_same_label_negatives(x64):
  scene = np.array([0, 1, 1, 0, 2, 1])
  margins = np.where(scene[:, None] == scene[None, :], 0.1, 0.2)
  images, texts = embeddings(16)
  check_value_and_grads(lambda x, y: labels.semantic_guided_triplet_loss(x, y, scene, DUPLICATE_IDS, margin=0.2),
                        lambda x, y: numpy_hinge(x, y, DUPLICATE_IDS, margins, hardest=True), [images, texts])


def numpy_affiliation(x, centres_of, scene, scale):
  total = 0.0
  for i, label in enumerate(scene):
    present = sorted(set(scene))
    logits = {k: scale * numpy_cosine(x[i:i + 1], centres_of[k][None])[0, 0] for k in present}
    total -= logits[label] - numpy_logsumexp(np.array(list(logits.values())))
  return total / len(scene)


def test_class_affiliation_and_distinction_loss(x64):
  images, texts = embeddings(17)
  scene = np.array([0, 3, 3, 0, 1, 3])  # class 2 absent from the batch

  def centres(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return {k: unit[scene == k].mean(axis=0) for k in set(scene)}

  def numpy_loss(x, y):
    return 0.5 * (numpy_affiliation(x, centres(y), scene, np.exp(1.0)) + numpy_affiliation(y, centres(x), scene,
                                                                                            np.exp(1.0)))

  check_value_and_grads(lambda x, y: labels.class_affiliation_loss(x, y, scene, num_classes=4, log_scale=1.0),
                        numpy_loss, [images, texts])
  np.testing.assert_allclose(
      labels.distinction_loss(images, texts, scene, DUPLICATE_IDS, num_classes=4, log_scale=1.0, class_weight=0.5),
      numpy_softmax(images, texts, DUPLICATE_IDS, 1.0) + 0.5 * numpy_loss(images, texts), rtol=1e-12)


def test_feature_uniformity_leaves_out_same_id_pairs(x64):
  x = np.random.default_rng(18).normal(size=(6, 3))
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  pairs = [np.exp(-2.0 * np.sum((unit[p] - unit[q]) ** 2))
           for p in range(6) for q in range(6) if DUPLICATE_IDS[p] != DUPLICATE_IDS[q]]
  np.testing.assert_allclose(uniformity.feature_uniformity(x, DUPLICATE_IDS, form="log"), np.log(np.mean(pairs)),
                             rtol=1e-12)


def test_hashing_losses(x64):
  codes = np.tanh(np.random.default_rng(19).normal(size=(6, 4)))
  signs = np.where(codes >= 0, 1.0, -1.0)
  check_value_and_grads(hashing.quantization_loss, lambda h: np.mean(np.sum((h - np.sign(h)) ** 2, axis=1)),
                        [codes])
  check_value_and_grads(hashing.bit_balance_loss, lambda h: np.sum(np.mean(h, axis=0) ** 2), [codes])
  np.testing.assert_array_equal(hashing.binary_codes(codes), signs)


def test_pairwise_likelihood_loss(x64):
  image_codes, text_codes = (np.tanh(e) for e in embeddings(20, d=4))

  def numpy_loss(h, g):
    theta = 0.5 * h @ g.T
    similar = DUPLICATE_IDS[:, None] == DUPLICATE_IDS[None, :]
    return np.mean(np.logaddexp(0.0, theta) - similar * theta)

  check_value_and_grads(lambda h, g: hashing.pairwise_likelihood_loss(h, g, DUPLICATE_IDS), numpy_loss,
                        [image_codes, text_codes])


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_hvsa_objective_sharded_impl_equals_global_on_8_devices(x64, impl):
  from rsalign_jax.runtime import sharding as sharding_lib
  mesh = sharding_lib.make_mesh()
  rng = np.random.default_rng(4)
  outputs = {"image_embedding": rng.normal(size=(16, 8)), "text_embedding": rng.normal(size=(16, 8))}
  outputs = sharding_lib.to_global(outputs, sharding_lib.batch_sharding(mesh))
  reference, sharded = hvsa.Objective(auto_weighting=True), hvsa.Objective(auto_weighting=True, impl=impl)
  params = reference.init(jax.random.key(0), outputs, None)

  def value_and_grad(objective):
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(lambda o: objective.apply(params, o, None)[0]))(outputs)

  (expected, expected_grad), (value, grad) = value_and_grad(reference), value_and_grad(sharded)
  np.testing.assert_allclose(value, expected, rtol=1e-10)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
