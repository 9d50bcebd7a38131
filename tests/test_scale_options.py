"""Scale-out options of the trainer on 8 virtual CPU devices: fsdp parameter sharding, bf16 compute, grad caching."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import assert_consistent_results, runlocal_config
from rsalign_jax import experiment, optimizers, train
from rsalign_jax.losses import hvsa as hvsa_objective
from rsalign_jax.models import base as model_base
from rsalign_jax.runtime import sharding as sharding_lib

VOCAB = 50


def synthetic_batch(config, rows=16, size=32):
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(rows, size, size, 3)).astype(np.float32),
          "tokens": rng.integers(1, VOCAB, size=(rows, config.text.max_len)).astype(np.int32),
          "lengths": rng.integers(3, config.text.max_len, size=(rows,)).astype(np.int32),
          "image_id": np.arange(rows, dtype=np.int32)}


def run_steps(config, model, objective, mesh, state_sharding_fn, steps=2, grad_cache_chunk=0):
  """(losses, initial params, final state) of `steps` train steps on a fixed batch."""
  batch = synthetic_batch(config)
  schedule = optimizers.make_schedule(config, steps_per_epoch=10)
  tx = optimizers.make_optimizer(config, schedule)
  with jax.set_mesh(mesh):
    init_fn = functools.partial(experiment.create_train_state, model=model, objective=objective, tx=tx,
                                example=jax.tree.map(jnp.asarray, batch))
    shardings = state_sharding_fn(jax.eval_shape(init_fn, jax.random.key(0)))
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(functools.partial(train.train_step, model=model, objective=objective, tx=tx, schedule=schedule,
                                     dropout_key=jax.random.key(1), grad_cache_chunk=grad_cache_chunk),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)))
    global_batch = sharding_lib.to_global(batch, sharding_lib.batch_sharding(mesh))
    initial = jax.device_get(state.params)
    losses = []
    for _ in range(steps):
      state, metrics = step(state, global_batch)
      losses.append(float(metrics["loss"]))
  return losses, initial, state


def assert_same_updates(initial, state, reference_state, rtol):
  """Parameter updates agree to `rtol` of the largest update of any parameter. (Per leaf is too strict: a bias
  followed by a normalisation has an exact gradient of 0, so its tiny update is pure float32 rounding noise.)"""
  largest = max(np.max(np.abs(np.asarray(b) - a)) for a, b in zip(jax.tree.leaves(initial),
                                                                  jax.tree.leaves(reference_state.params)))
  def check(path, a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * largest, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, state.params, reference_state.params)


def replicated_fn(mesh):
  return lambda abstract: jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)


def test_fsdp_shards_large_parameters_and_their_moments_and_trains_identically(tmp_path_factory):
  # eps=1: Adam's update is then ~ the gradient, so float32 reduction-order noise (a different sharding sums in a
  # different order) is not amplified into sign flips of near-zero gradients, as in tests/test_distributed.py.
  config = runlocal_config(tmp_path_factory, **{"loss.impl": "ring", "optimizer.eps": 1.0})
  model, objective = experiment.build_model(config, VOCAB), experiment.build_objective(config)
  plain_mesh, fsdp_mesh = sharding_lib.make_mesh(), sharding_lib.make_mesh(fsdp=4)
  assert dict(fsdp_mesh.shape) == {"data": 2, "fsdp": 4}
  shard = functools.partial(sharding_lib.state_shardings, mesh=fsdp_mesh, patterns=("model/.*",), min_size=1000)
  plain_losses, initial, plain_state = run_steps(config, model, objective, plain_mesh, replicated_fn(plain_mesh))
  fsdp_losses, _, fsdp_state = run_steps(config, model, objective, fsdp_mesh, shard)

  np.testing.assert_allclose(fsdp_losses, plain_losses, rtol=1e-5)
  assert_same_updates(initial, fsdp_state, plain_state, rtol=0.02)
  kernel = fsdp_state.params["model"]["text_fc"]["kernel"]  # (32, 32): 1024 elements, sharded
  assert kernel.sharding.spec == P("fsdp", None) or kernel.sharding.spec == P(None, "fsdp")
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(fsdp_state.opt_state)
             if jax.tree_util.keystr(path).endswith("['model']['text_fc']['kernel']")]
  assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)  # Adam's mu and nu
  bias = fsdp_state.params["model"]["text_fc"]["bias"]  # 32 elements < min_size: replicated
  assert bias.sharding.spec == P()


def test_fsdp_spec_picks_the_largest_divisible_dimension():
  assert sharding_lib.fsdp_spec((3, 512, 8), 4) == P(None, "fsdp", None)
  assert sharding_lib.fsdp_spec((6, 9), 4) == P()  # no dimension divides
  assert sharding_lib.fsdp_spec((6, 9), 3) == P(None, "fsdp")
  with pytest.raises(ValueError, match="sharding.fsdp=3 must be a positive divisor of the 8 devices"):
    sharding_lib.make_mesh(fsdp=3)


def test_bfloat16_compute_keeps_float32_params_and_embeddings(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, compute_dtype="bfloat16")
  model = experiment.build_model(config, VOCAB)
  batch = jax.tree.map(jnp.asarray, synthetic_batch(config, rows=4))
  variables = model.init(jax.random.key(0), batch["image"], batch["tokens"], batch["lengths"], train=False)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, batch["image"], train=False, method="embed_images"))(variables))
  assert "conv_general_dilated" in jaxpr and "bf16[4,16,16" in jaxpr  # the stem conv runs in bfloat16
  embeddings = model.apply(variables, batch["image"], batch["tokens"], batch["lengths"], train=False)
  assert {x.dtype for x in jax.tree.leaves(embeddings)} == {jnp.dtype("float32")}

  float32_model = experiment.build_model(runlocal_config(tmp_path_factory), VOCAB)
  reference = float32_model.apply(variables, batch["image"], batch["tokens"], batch["lengths"], train=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05), embeddings, reference)
  with pytest.raises(ValueError, match="compute_dtype='int8': expected one of"):
    experiment.build_model(runlocal_config(tmp_path_factory, compute_dtype="int8"), VOCAB)


class TwoTowers(model_base.RetrievalModel):
  """Per-example embeddings, no BatchNorm and no dropout (grad caching draws dropout masks per chunk): the cached
  step is then exactly the direct one."""
  vocab_size: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.image, self.embed, self.text = nn.Dense(8), nn.Embed(self.vocab_size, 8), nn.Dense(8)

  def embed_images(self, images, *, train):
    return self.image(images.reshape(images.shape[0], -1))

  def embed_texts(self, tokens, lengths, *, train):
    return self.text(self.embed(tokens).mean(axis=1))

  def score(self, image_embedding, text_embedding):
    return image_embedding @ text_embedding.T

  def __call__(self, images, tokens, lengths, *, train):
    return {"image_embedding": self.embed_images(images, train=train),
            "text_embedding": self.embed_texts(tokens, lengths, train=train)}


def test_grad_cache_step_equals_the_direct_step(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, **{"optimizer.name": "adam", "optimizer.eps": 1.0})
  objective = hvsa_objective.Objective(uniformity_stride=2, auto_weighting=True)  # learned params in the objective
  mesh = sharding_lib.make_mesh()
  direct_losses, initial, direct = run_steps(config, TwoTowers(VOCAB), objective, mesh, replicated_fn(mesh), steps=3)
  cached_losses, _, cached = run_steps(config, TwoTowers(VOCAB), objective, mesh, replicated_fn(mesh), steps=3,
                                       grad_cache_chunk=8)
  np.testing.assert_allclose(cached_losses, direct_losses, rtol=1e-5)
  assert_same_updates(initial, cached, direct, rtol=1e-3)


class PairwiseScores(TwoTowers):
  PAIRWISE = True

  def __call__(self, images, tokens, lengths, *, train):
    outputs = super().__call__(images, tokens, lengths, train=train)
    return {"scores": outputs["image_embedding"] @ outputs["text_embedding"].T}


def test_grad_cache_refuses_pairwise_model_outputs(tmp_path_factory, monkeypatch):
  config = runlocal_config(tmp_path_factory, grad_cache_chunk=8)
  monkeypatch.setattr(experiment, "build_model", lambda config, vocab_size: PairwiseScores(vocab_size))
  with pytest.raises(ValueError, match=r"grad_cache_chunk=8: model 'hvsa' is PAIRWISE .* set grad_cache_chunk=0"):
    experiment.build_setup(config, str(tmp_path_factory.mktemp("pairwise")), sharding_lib.make_mesh())


def test_trainer_runs_with_fsdp_bfloat16_and_grad_caching(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, compute_dtype="bfloat16", grad_cache_chunk=8,
                           **{"sharding.fsdp": 2, "sharding.fsdp_min_size": 256})
  results = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("scaled")))
  assert results["total_steps"] == 4
  assert_consistent_results(results)
