"""Every sharded loss ('gather', 'ring', 'ring' in column chunks) equals its global reference on 8 virtual CPU
devices, in value and in gradient: float64 to 1e-10, float32 to 1e-5, with duplicate ids and exact score ties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax import similarity
from rsalign_jax.losses import contrastive, hashing, labels, sigmoid, triplet, uniformity
from rsalign_jax.runtime import sharding

B, D = 32, 8  # 4 rows per device
SHARDED = [("gather", None), ("ring", None), ("ring", 2)]


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sharding.make_mesh()


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def random_batch(seed, dtype=np.float64):
  rng = np.random.default_rng(seed)
  return {
      "images": rng.normal(size=(B, D)).astype(dtype),
      "texts": rng.normal(size=(B, D)).astype(dtype),
      "ids": rng.integers(0, 20, B),  # uneven multiplicities: singletons, pairs, triples
      "labels": rng.integers(0, 4, B),
      "prior": rng.uniform(size=(B, B)),
  }


def tied_batch(seed):
  """Integer-valued rows (so every score is computed exactly) where each image and each caption occurs twice,
  the twins on different devices and of different ids: hardest negatives tie across devices."""
  rng = np.random.default_rng(seed)
  twins = lambda: np.repeat(rng.choice([-2.0, -1.0, 1.0, 2.0], size=(B // 2, D)), 2, axis=0)[rng.permutation(B)]
  batch = random_batch(seed)
  batch.update(images=twins(), texts=twins(), ids=np.arange(B) // 3 * 2)  # ids repeat in threes
  return batch


def softmax(p, batch, **impl):
  return contrastive.softmax_loss(p["images"], p["texts"], batch["ids"], log_scale=p["log_scale"], **impl)


def siglip(p, batch, **impl):
  return sigmoid.sigmoid_loss(p["images"], p["texts"], batch["ids"], log_scale=p["log_scale"], bias=p["bias"],
                              **impl)


def vse0(p, batch, **impl):
  return triplet.vse_loss(p["images"], p["texts"], batch["ids"], margin=0.2, negatives="sum", **impl)


def vse_hardest(p, batch, **impl):
  return triplet.vse_loss(p["images"], p["texts"], batch["ids"], margin=0.2, negatives="hardest", **impl)


def hvsa_weighted(p, batch, **impl):
  return triplet.difficulty_weighted_loss(p["images"], p["texts"], margin=0.2, beta=0.5, **impl)


def amfmn_dynamic(p, batch, **impl):
  return triplet.dynamic_margin_loss(p["images"], p["texts"], batch["prior"], batch["ids"], **impl)


def ssjdn_semantic(p, batch, **impl):
  return labels.semantic_guided_triplet_loss(p["images"], p["texts"], batch["labels"], batch["ids"], **impl)


def uniformity_exp_mean(p, batch, **impl):
  return uniformity.feature_uniformity(p["images"], batch["ids"], gamma=2.0, form="exp_mean", **impl)


def uniformity_log(p, batch, **impl):
  return uniformity.feature_uniformity(p["texts"], batch["ids"], gamma=2.0, form="log", **impl)


def hash_likelihood(p, batch, **impl):
  return hashing.pairwise_likelihood_loss(jnp.tanh(p["images"]), jnp.tanh(p["texts"]), batch["ids"], **impl)


def params_of(batch):
  dtype = jnp.promote_types(batch["images"].dtype, jnp.float32)
  return {"images": batch["images"], "texts": batch["texts"], "log_scale": np.asarray(2.3, dtype),
          "bias": np.asarray(-1.5, dtype)}


def value_and_grad(loss, batch, **impl):
  return jax.jit(jax.value_and_grad(lambda p: loss(p, batch, **impl)))(params_of(batch))


def assert_tree_close(actual, expected, rtol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


def check_sharded_equals_global(loss, batch, mesh, rtol):
  expected = value_and_grad(loss, batch, impl="global")
  assert np.isfinite(expected[0]) and expected[0] != 0
  for impl, block_size in SHARDED:
    assert_tree_close(value_and_grad(loss, batch, impl=impl, mesh=mesh, block_size=block_size), expected, rtol)


@pytest.mark.parametrize("loss", [softmax, siglip, vse0, vse_hardest, hvsa_weighted, amfmn_dynamic, ssjdn_semantic,
                                  uniformity_exp_mean, uniformity_log, hash_likelihood])
def test_sharded_equals_global_float64(x64, mesh, loss):
  check_sharded_equals_global(loss, random_batch(0), mesh, rtol=1e-10)


@pytest.mark.parametrize("loss", [vse_hardest, ssjdn_semantic])
def test_sharded_equals_global_with_exact_ties(x64, mesh, loss):
  batch = tied_batch(1)
  scores = similarity.unit_cosine_similarity(batch["images"], batch["texts"])
  costs, _ = triplet.hinge_costs(scores, 0.2, batch["ids"][:, None] != batch["ids"][None, :])
  hardest = np.max(costs, axis=1, keepdims=True)
  assert np.any((np.sum(costs == hardest, axis=1) > 1) & (hardest[:, 0] > 0)), "want tied hardest negatives"
  check_sharded_equals_global(loss, batch, mesh, rtol=1e-10)


def test_gather_in_column_chunks(x64, mesh):
  batch = random_batch(2)
  for loss in (softmax, vse_hardest):
    assert_tree_close(value_and_grad(loss, batch, impl="gather", mesh=mesh, block_size=8),
                      value_and_grad(loss, batch, impl="global"), rtol=1e-10)


@pytest.mark.parametrize("loss", [softmax, siglip, vse_hardest])
def test_sharded_equals_global_float32(mesh, loss):
  check_sharded_equals_global(loss, random_batch(3, np.float32), mesh, rtol=1e-5)


def test_bfloat16_embeddings_compute_in_float32(mesh):
  batch = random_batch(4)
  bf16 = dict(batch, images=batch["images"].astype(jnp.bfloat16), texts=batch["texts"].astype(jnp.bfloat16))
  upcast = dict(batch, images=np.asarray(bf16["images"], np.float32), texts=np.asarray(bf16["texts"], np.float32))
  for impl in ("global", "ring"):
    value, grads = value_and_grad(softmax, bf16, impl=impl, mesh=mesh)
    assert value.dtype == jnp.float32 and grads["images"].dtype == jnp.bfloat16
    np.testing.assert_allclose(value, value_and_grad(softmax, upcast, impl="global")[0], rtol=1e-5)


def test_bad_impl_mesh_and_block_size_are_rejected(mesh):
  batch = random_batch(5)
  with pytest.raises(ValueError, match="expected one of"):
    softmax(params_of(batch), batch, impl="allreduce", mesh=mesh)
  with pytest.raises(ValueError, match="needs the device mesh"):
    softmax(params_of(batch), batch, impl="ring")
  with pytest.raises(ValueError, match="must divide"):
    softmax(params_of(batch), batch, impl="ring", mesh=mesh, block_size=3)
  with pytest.raises(ValueError, match="negatives"):
    triplet.vse_loss(batch["images"], batch["texts"], negatives="mean")
