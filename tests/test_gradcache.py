"""Gradient caching equals the direct full-batch gradient (float64), sharded or not; accumulation does not."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rsalign_jax.gradcache import gradcache_value_and_grad
from rsalign_jax.losses import contrastive, triplet
from rsalign_jax.models import hvsa
from rsalign_jax.runtime import sharding as sharding_lib


class TwoTower(nn.Module):
  """Per-example image and text MLP towers (no BatchNorm), optionally with dropout."""
  width: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, *, train):
    def tower(x, name):
      x = nn.tanh(nn.Dense(self.width, name=f"{name}_hidden")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      return nn.Dense(6, name=f"{name}_out")(x)
    return {"image_embedding": tower(batch["image"], "image"), "text_embedding": tower(batch["text"], "text")}


def softmax_objective(params, embeddings, batch):
  loss = contrastive.softmax_loss(embeddings["image_embedding"], embeddings["text_embedding"], batch["image_id"],
                                  log_scale=params["log_scale"])
  return loss, {"scale": jnp.exp(params["log_scale"])}


def triplet_objective(params, embeddings, batch):
  del params, batch
  loss = triplet.difficulty_weighted_loss(embeddings["image_embedding"], embeddings["text_embedding"], margin=0.4)
  return loss, {}


OBJECTIVES = {"softmax": (softmax_objective, {"log_scale": np.log(10.0)}), "triplet": (triplet_objective, {})}


def make_problem(batch_size, objective, dropout=0.0, width=12, seed=0):
  """(embed_fn, loss_fn, params, batch) in float64 (call under `jax.enable_x64`)."""
  rng = np.random.default_rng(seed)
  batch = {"image": rng.normal(size=(batch_size, 5)), "text": rng.normal(size=(batch_size, 4)),
           "image_id": np.arange(batch_size) // 2}  # two captions per image: multi-positive softmax
  model = TwoTower(width, dropout)
  model_params = model.init(jax.random.key(seed), jax.tree.map(lambda x: x[:1], batch), train=False)["params"]
  model_params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float64), model_params)
  loss_fn, objective_params = OBJECTIVES[objective]

  def embed_fn(model_params, chunk, rng):
    return model.apply({"params": model_params}, chunk, train=True, rngs={"dropout": rng}), {}

  params = {"model": model_params, "objective": jax.tree.map(jnp.float64, objective_params)}
  return embed_fn, loss_fn, params, jax.tree.map(jnp.asarray, batch)


def direct_value_and_grad(embed_fn, loss_fn, params, batch):
  def total(params):
    embeddings, _ = embed_fn(params["model"], batch, jax.random.key(0))
    return loss_fn(params["objective"], embeddings, batch)
  return jax.value_and_grad(total, has_aux=True)(params)


def assert_tree_close(actual, expected, rtol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype == jnp.float64
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


def relative_error(actual, expected):
  """||actual - expected|| / ||expected|| over all leaves of two pytrees."""
  def squared_norm(tree):
    return sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
  return (squared_norm(jax.tree.map(jnp.subtract, actual, expected)) / squared_norm(expected)) ** 0.5


@pytest.mark.parametrize("objective", ["softmax", "triplet"])
@pytest.mark.parametrize("batch_size, chunk_size", [(12, 1), (12, 4), (16, 8), (16, 16)])
def test_equals_direct_gradient(objective, batch_size, chunk_size):
  with jax.enable_x64(True):
    embed_fn, loss_fn, params, batch = make_problem(batch_size, objective)
    (loss, (aux, state)), grads = jax.jit(functools.partial(
        gradcache_value_and_grad, embed_fn, loss_fn, chunk_size=chunk_size))(params, batch, rng=jax.random.key(1))
    (expected_loss, expected_aux), expected_grads = direct_value_and_grad(embed_fn, loss_fn, params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
    assert_tree_close(aux, expected_aux, 1e-10)
    assert_tree_close(grads, expected_grads, 1e-10)
    assert state == {}
    assert float(loss) > 0.01 and all(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(grads))
    if objective == "softmax":
      assert abs(float(grads["objective"]["log_scale"])) > 1e-4  # the temperature is learned through the cache


def test_dropout_uses_the_same_rng_per_chunk_in_both_passes():
  batch_size, chunk_size = 12, 4
  rng = jax.random.key(3)
  with jax.enable_x64(True):
    embed_fn, loss_fn, params, batch = make_problem(batch_size, "softmax", dropout=0.5)

    def chunk_by_chunk(params):  # chunk k = rows k, k + 3, ... embedded with fold_in(rng, k), differentiated directly
      n = batch_size // chunk_size
      parts = [embed_fn(params["model"], jax.tree.map(lambda x: x[k::n], batch), jax.random.fold_in(rng, k))[0]
               for k in range(n)]
      embeddings = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(batch_size, -1), *parts)
      return loss_fn(params["objective"], embeddings, batch)

    (expected_loss, _), expected_grads = jax.value_and_grad(chunk_by_chunk, has_aux=True)(params)
    (loss, _), grads = gradcache_value_and_grad(embed_fn, loss_fn, params, batch, chunk_size=chunk_size, rng=rng)
    (no_dropout_loss, _), _ = direct_value_and_grad(*make_problem(batch_size, "softmax"))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
    assert_tree_close(grads, expected_grads, 1e-10)
    assert abs(float(loss) - float(no_dropout_loss)) > 1e-3  # dropout did act


@pytest.mark.parametrize("impl", ["global", "ring"])
def test_sharded_batch_equals_unsharded_direct_gradient(impl):
  assert jax.device_count() == 8
  mesh = sharding_lib.make_mesh()
  batch_size, chunk_size = 32, 16
  with jax.enable_x64(True), jax.set_mesh(mesh):
    embed_fn, _, params, batch = make_problem(batch_size, "softmax")

    def loss_fn(params, embeddings, batch):
      return contrastive.softmax_loss(embeddings["image_embedding"], embeddings["text_embedding"], batch["image_id"],
                                      log_scale=params["log_scale"], impl=impl), {}

    sharded_batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    step = jax.jit(functools.partial(gradcache_value_and_grad, embed_fn, loss_fn, chunk_size=chunk_size),
                   out_shardings=NamedSharding(mesh, P()))
    (loss, _), grads = step(params, sharded_batch, rng=jax.random.key(0))
  with jax.enable_x64(True):
    (expected_loss, _), expected_grads = direct_value_and_grad(embed_fn, softmax_objective, params, batch)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
  assert_tree_close(grads, expected_grads, 1e-10)


def test_gradient_accumulation_is_not_the_full_batch_gradient():
  """Averaging per-chunk losses' gradients drops every cross-chunk negative; gradient caching keeps them."""
  batch_size, chunk_size = 16, 4
  with jax.enable_x64(True):
    embed_fn, loss_fn, params, batch = make_problem(batch_size, "softmax")
    _, expected = direct_value_and_grad(embed_fn, loss_fn, params, batch)
    _, cached = gradcache_value_and_grad(embed_fn, loss_fn, params, batch, chunk_size=chunk_size,
                                         rng=jax.random.key(0))
    chunks = [jax.tree.map(lambda x: x[k:k + chunk_size], batch) for k in range(0, batch_size, chunk_size)]
    chunk_grads = [direct_value_and_grad(embed_fn, loss_fn, params, chunk)[1] for chunk in chunks]
    accumulated = jax.tree.map(lambda *g: sum(g) / len(g), *chunk_grads)

    assert relative_error(cached, expected) < 1e-12
    assert relative_error(accumulated, expected) > 0.1


@pytest.mark.parametrize("chunk_size", [5, 0, -4])
def test_chunk_size_must_divide_the_batch(chunk_size):
  with jax.enable_x64(True):
    embed_fn, loss_fn, params, batch = make_problem(12, "triplet")
  with pytest.raises(ValueError, match=f"chunk_size={chunk_size} must be a positive divisor of the batch size 12"):
    gradcache_value_and_grad(embed_fn, loss_fn, params, batch, chunk_size=chunk_size, rng=jax.random.key(0))


def test_peak_memory_is_one_chunks_activations():
  """At a fixed global batch, XLA's temporary memory of the gradient falls with the chunk size."""
  with jax.enable_x64(True):
    embed_fn, loss_fn, params, batch = make_problem(256, "softmax", width=2048)  # activations dominate

    def temp_bytes(chunk_size):
      step = jax.jit(functools.partial(gradcache_value_and_grad, embed_fn, loss_fn, chunk_size=chunk_size))
      return step.lower(params, batch, rng=jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

    full, quarter = temp_bytes(256), temp_bytes(64)
  assert full > 256 * 2048 * 8  # one tower's (B, width) float64 activations
  assert quarter < 0.5 * full


def test_hvsa_model_with_batchnorm_and_dropout():
  """HVSA (BN in the ResNet, dropout in the GRU) runs through the cache; one chunk reproduces the direct step."""
  batch_size, max_len = 4, 6
  model = hvsa.Model(vocab_size=9, embed_dim=16, resnet_width=8, kea_slots=4, word_dim=5, hidden_dim=7)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
           "tokens": jnp.asarray(rng.integers(1, 9, size=(batch_size, max_len)), jnp.int32),
           "lengths": jnp.asarray(rng.integers(2, max_len + 1, size=(batch_size,)), jnp.int32)}
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), batch["image"], batch["tokens"],
                                                                 batch["lengths"])
  params = {"model": variables["params"], "objective": {}}
  dropout_rng = jax.random.key(1)

  def embed_fn(model_params, chunk, rng):
    outputs, updates = model.apply({"params": model_params, "batch_stats": variables["batch_stats"]}, chunk["image"],
                                   chunk["tokens"], chunk["lengths"], train=True, rngs={"dropout": rng},
                                   mutable=["batch_stats"])
    return outputs, updates["batch_stats"]

  def loss_fn(objective_params, outputs, batch):
    del objective_params, batch
    return triplet.difficulty_weighted_loss(outputs["image_embedding"], outputs["text_embedding"]), {}

  def direct(params):
    outputs, batch_stats = embed_fn(params["model"], batch, jax.random.fold_in(dropout_rng, 0))
    loss, aux = loss_fn(params["objective"], outputs, batch)
    return loss, (aux, batch_stats)

  cached = jax.jit(functools.partial(gradcache_value_and_grad, embed_fn, loss_fn), static_argnames="chunk_size")
  (loss, (_, batch_stats)), grads = cached(params, batch, chunk_size=batch_size, rng=dropout_rng)
  (expected_loss, (_, expected_stats)), expected_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert relative_error(grads, expected_grads) < 1e-4  # float32; some leaves (biases before BN) are ~0 noise
  assert relative_error(batch_stats, expected_stats) < 1e-5

  (chunked_loss, (_, chunked_stats)), chunked_grads = cached(params, batch, chunk_size=2, rng=dropout_rng)
  assert jax.tree.structure(chunked_grads) == jax.tree.structure(params)
  assert jax.tree.structure(chunked_stats) == jax.tree.structure(variables["batch_stats"])
  assert np.isfinite(float(chunked_loss)) and float(chunked_loss) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(chunked_grads))
  assert abs(float(chunked_loss) - float(loss)) > 1e-6  # per-chunk BN statistics and dropout masks: another loss
