"""HVSA towers against numpy references: ResNet trunk, KEA, the uni-skip GRU, the Model and its cosine score."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.models import hvsa
from rsalign_jax.models import layers
from rsalign_jax.models import pooling
from rsalign_jax.models import recurrence
from rsalign_jax.models import resnet
from rsalign_jax.models import skipthoughts

VOCAB, WORD_DIM, HIDDEN = 9, 5, 7
TINY_HVSA = dict(vocab_size=VOCAB, embed_dim=16, resnet_width=8, kea_slots=4, word_dim=WORD_DIM, hidden_dim=HIDDEN)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _randomize(tree, seed):
  """Replaces every leaf by N(0, 0.5) noise so that references do not depend on the init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.5 * rng.normal(size=x.shape).astype(np.float32), tree)


# ---------------------------------------------------------------- ResNet


def _init_shapes(module, *inputs):
  return jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x, train=False), *inputs)


def test_resnet18_stage_shapes_at_256px():
  model = resnet.ResNet(depth=18, width=64)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  features = jax.eval_shape(functools.partial(model.apply, train=False), _init_shapes(model, images), images)
  assert {k: v.shape for k, v in features.items()} == {
      "f1": (2, 64, 64, 64), "f2": (2, 32, 32, 128), "f3": (2, 16, 16, 256), "f4": (2, 8, 8, 512)}


@pytest.mark.parametrize("depth, torchvision_params", [(18, 11_689_512), (34, 21_797_672)])
def test_resnet_param_count_equals_torchvision_without_fc(depth, torchvision_params):
  params = _init_shapes(resnet.ResNet(depth, 64), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == torchvision_params - (512 * 1000 + 1000)


def test_resnet_uses_torchvision_names():
  params = _init_shapes(resnet.ResNet(18, 16), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  assert set(params) == {"conv1", "bn1"} | {f"layer{s}_{b}" for s in range(1, 5) for b in range(2)}
  assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_conv", "downsample_bn"}
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 16)
  assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 16, 32)


def test_max_pool_pads_with_minus_infinity():
  x = -1 - np.abs(_normal(1, 4, 4, 1))  # all negative: zero padding would win every border window
  padded = np.pad(x[0, :, :, 0], 1, constant_values=-np.inf)
  expected = [[padded[2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(2)] for i in range(2)]
  np.testing.assert_array_equal(resnet.torch_max_pool(x)[0, :, :, 0], expected)


def _first_max_pool_gradient(x, grad, kernel, stride, padding):
  """numpy: each output's gradient goes to the first (row-major) maximum of its window, as PyTorch routes it."""
  b, h, w, c = x.shape
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
  out = np.zeros_like(padded)
  for n, i, j, ch in np.ndindex(*grad.shape):
    window = padded[n, i * stride:i * stride + kernel, j * stride:j * stride + kernel, ch]
    dy, dx = np.unravel_index(np.argmax(window), window.shape)  # argmax returns the first maximum
    out[n, i * stride + dy, j * stride + dx, ch] += grad[n, i, j, ch]
  return out[:, padding:padding + h, padding:padding + w]


@pytest.mark.parametrize("shape,kernel,stride,padding", [((2, 9, 7, 3), 3, 2, 1), ((1, 8, 8, 2), 3, 2, 1),
                                                         ((1, 7, 6, 2), 2, 2, 0), ((1, 6, 6, 1), 3, 1, 1)])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(shape, kernel, stride, padding):
  # Rounded values make ties inside windows common; ReLU-like zeros too.
  x = np.maximum(np.round(_normal(*shape, seed=1)), 0)
  out, vjp = jax.vjp(lambda x: pooling.max_pool(x, kernel, stride, padding), x)
  grad = _normal(*out.shape, seed=2)
  np.testing.assert_allclose(vjp(grad)[0], _first_max_pool_gradient(x, grad, kernel, stride, padding), atol=1e-6)
  untied = _normal(*shape, seed=3)
  flax_pool = lambda x: flax.linen.max_pool(x, (kernel, kernel), (stride, stride), ((padding,) * 2,) * 2)
  np.testing.assert_array_equal(pooling.max_pool(untied, kernel, stride, padding), flax_pool(untied))
  np.testing.assert_allclose(jax.vjp(lambda x: pooling.max_pool(x, kernel, stride, padding), untied)[1](grad)[0],
                             jax.vjp(flax_pool, untied)[1](grad)[0], atol=1e-6)


# ---------------------------------------------------------------- layers


def test_torch_dense_init_is_pytorch_default():
  fan_in = 400
  params = layers.torch_dense(300, fan_in=fan_in).init(jax.random.key(0), jnp.zeros((1, fan_in)))["params"]
  bound = 1 / math.sqrt(fan_in)
  for p in (params["kernel"], params["bias"]):
    assert bound * 0.95 < np.abs(p).max() <= bound
  np.testing.assert_allclose(np.std(params["kernel"]), bound / math.sqrt(3), rtol=0.02)


def _kea_reference(x0, params, eps=1e-5):
  """KEA in PyTorch's NCHW layout with train-mode BatchNorm, transcribed from docs/METHODS.md §2.2, in float64."""
  x0 = np.asarray(x0, np.float64).transpose(0, 3, 1, 2)
  b, c, h, w = x0.shape
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.einsum("oi,bihw->bohw", p["conv1"]["kernel"].T, x0) + p["conv1"]["bias"][:, None, None]
  attn = np.einsum("sc,bcn->bsn", p["key_memory"], x.reshape(b, c, h * w))
  attn = np.exp(attn - attn.max(axis=2, keepdims=True))
  attn /= attn.sum(axis=2, keepdims=True)
  attn /= 1e-9 + attn.sum(axis=1, keepdims=True)
  y = np.einsum("cs,bsn->bcn", p["value_memory"], attn).reshape(b, c, h, w)
  y = np.einsum("oi,bihw->bohw", p["conv2"]["kernel"].T, y)
  mean, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
  y = (y - mean) / np.sqrt(var + eps) * p["bn"]["scale"][:, None, None] + p["bn"]["bias"][:, None, None]
  return np.maximum(y + x0, 0).transpose(0, 2, 3, 1)


@pytest.fixture(name="kea", scope="module")
def _kea():
  module = layers.KeyEntityAttention(slots=5)
  x0 = _normal(2, 3, 3, 8)
  return module, jax.jit(functools.partial(module.init, train=False))(jax.random.key(1), x0), x0


def test_kea_matches_numpy_reference(kea):
  module, variables, x0 = kea
  params = _randomize(variables["params"], seed=2)
  out, _ = module.apply({**variables, "params": params}, x0, train=True, mutable=["batch_stats"])
  assert out.shape == x0.shape
  np.testing.assert_allclose(out, _kea_reference(x0, params), rtol=1e-5, atol=1e-5)


def test_kea_value_memory_starts_as_key_memory_transposed(kea):
  _, variables, _ = kea
  params = variables["params"]
  assert params["key_memory"].shape == (5, 8)
  np.testing.assert_array_equal(params["value_memory"], params["key_memory"].T)
  assert np.abs(params["key_memory"]).max() <= 1 / math.sqrt(8)


def test_kea_is_a_residual_block(kea):
  """With the BN output zeroed, KEA reduces to ReLU of its input."""
  module, variables, x0 = kea
  params = dict(variables["params"], bn={"scale": jnp.zeros(8), "bias": jnp.zeros(8)})
  out = module.apply({**variables, "params": params}, x0, train=False)
  np.testing.assert_array_equal(out, np.maximum(x0, 0))


# ---------------------------------------------------------------- skip-thoughts GRU


def _gru_reference(params, tokens, lengths, masks=None):
  """docs/METHODS.md §1.5 step by step in float64, with per-gate weights split out of the uni_skip.npz-style arrays."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h_dim = p["encoder_Ux"].shape[0]
  w_r, w_z = p["encoder_W"][:, :h_dim], p["encoder_W"][:, h_dim:]
  b_r, b_z = p["encoder_b"][:h_dim], p["encoder_b"][h_dim:]
  u_r, u_z = p["encoder_U"][:, :h_dim], p["encoder_U"][:, h_dim:]
  if masks is None:
    mx_r = mx_z = mx_n = mh_r = mh_z = mh_n = 1.0
  else:
    mx_r, mx_z, mx_n, mh_r, mh_z, mh_n = [np.asarray(m, np.float64).reshape(m.shape[0], -1) for m in masks]
  table = p["embedding"].copy()
  table[0] = 0
  h = np.zeros((tokens.shape[0], h_dim))
  states = []
  for t in range(tokens.shape[1]):
    x = table[tokens[:, t]]
    r = _sigmoid((x * mx_r) @ w_r + b_r + (h * mh_r) @ u_r)
    z = _sigmoid((x * mx_z) @ w_z + b_z + (h * mh_z) @ u_z)
    n = np.tanh((x * mx_n) @ p["encoder_Wx"] + p["encoder_bx"] + r * ((h * mh_n) @ p["encoder_Ux"]))
    h = (1 - z) * n + z * h
    states.append(h)
  return np.stack(states)[np.maximum(lengths, 1) - 1, np.arange(tokens.shape[0])]


@pytest.fixture(name="gru", scope="module")
def _gru():
  encoder = skipthoughts.BayesianUniSkip(VOCAB, WORD_DIM, HIDDEN, dropout=0.25)
  tokens = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0], [5, 0, 0, 0, 0]], np.int32)
  lengths = np.array([5, 3, 1], np.int32)
  params = jax.jit(functools.partial(encoder.init, train=False))(jax.random.key(0), tokens, lengths)["params"]
  return encoder, params, tokens, lengths


def test_gru_params_follow_uni_skip_npz(gru):
  _, params, _, _ = gru
  assert jax.tree.map(jnp.shape, params) == {
      "embedding": (VOCAB + 1, WORD_DIM), "encoder_W": (WORD_DIM, 2 * HIDDEN), "encoder_b": (2 * HIDDEN,),
      "encoder_U": (HIDDEN, 2 * HIDDEN), "encoder_Wx": (WORD_DIM, HIDDEN), "encoder_bx": (HIDDEN,),
      "encoder_Ux": (HIDDEN, HIDDEN)}
  np.testing.assert_array_equal(params["embedding"][0], 0)
  assert np.abs(params["encoder_U"]).max() <= 1 / math.sqrt(HIDDEN)


def test_gru_matches_numpy_reference(gru):
  encoder, params, tokens, lengths = gru
  out = encoder.apply({"params": params}, tokens, lengths, train=False)
  assert out.shape == (3, HIDDEN)
  np.testing.assert_allclose(out, _gru_reference(params, tokens, lengths), atol=1e-5)


def test_gru_reads_the_last_real_token(gru):
  encoder, params, tokens, lengths = gru
  out = encoder.apply({"params": params}, tokens, lengths, train=False)
  padded = np.pad(tokens, ((0, 0), (0, 4)))
  np.testing.assert_allclose(encoder.apply({"params": params}, padded, lengths, train=False), out, atol=1e-6)
  for i, length in enumerate(lengths):
    alone = encoder.apply({"params": params}, tokens[i:i + 1, :length], lengths[i:i + 1], train=False)
    np.testing.assert_allclose(alone[0], out[i], atol=1e-6)


def test_empty_caption_is_one_step_on_the_zero_embedding(gru):
  encoder, params, _, _ = gru
  out = encoder.apply({"params": params}, np.zeros((2, 4), np.int32), np.array([0, 1]), train=False)
  # h_0 = 0 and x = 0 leave only the input biases: h_1 = (1 - sig(b_z)) * tanh(b_x).
  expected = (1 - _sigmoid(np.asarray(params["encoder_b"][HIDDEN:]))) * np.tanh(np.asarray(params["encoder_bx"]))
  np.testing.assert_allclose(out, np.stack([expected, expected]), atol=1e-6)


def test_variational_dropout_masks_are_shared_by_all_steps(gru, monkeypatch):
  encoder, params, tokens, lengths = gru
  draw_masks, drawn = skipthoughts.variational_dropout_masks, []

  def recording_masks(*args):
    drawn.append(draw_masks(*args))
    return drawn[-1]

  monkeypatch.setattr(skipthoughts, "variational_dropout_masks", recording_masks)
  rngs = {"dropout": jax.random.key(7)}
  out = encoder.apply({"params": params}, tokens, lengths, train=True, rngs=rngs)

  (masks,) = drawn
  assert [m.shape for m in masks] == [(3, 1, WORD_DIM)] * 3 + [(3, HIDDEN)] * 3
  for m in masks:
    assert set(np.unique(m)) <= {0.0, np.float32(1 / 0.75)}
  for paths in (masks[:3], masks[3:]):
    assert all(not np.array_equal(a, b) for i, a in enumerate(paths) for b in paths[i + 1:])
  # The reference applies each of the six fixed masks at every step.
  np.testing.assert_allclose(out, _gru_reference(params, tokens, lengths, masks), atol=1e-5)
  np.testing.assert_array_equal(encoder.apply({"params": params}, tokens, lengths, train=True, rngs=rngs), out)
  assert not np.allclose(out, encoder.apply({"params": params}, tokens, lengths, train=False), atol=1e-3)


def test_padding_row_gets_no_gradient(gru):
  encoder, params, tokens, lengths = gru

  @jax.jit
  @jax.value_and_grad
  def loss(p):
    return encoder.apply({"params": p}, tokens, lengths, train=True, rngs={"dropout": jax.random.key(1)}).sum()

  value, grads = loss(params)
  np.testing.assert_array_equal(grads["embedding"][0], 0)
  assert (np.abs(grads["embedding"][np.unique(tokens[tokens != 0])]).max(axis=1) > 0).all()
  nonzero_pad_value, nonzero_pad_grads = loss(dict(params, embedding=params["embedding"].at[0].set(1.0)))
  np.testing.assert_array_equal(nonzero_pad_grads["embedding"][0], 0)
  np.testing.assert_allclose(nonzero_pad_value, value, rtol=1e-6)


def _scan_gru_states(inputs, kernels, masks, steps):
  """The recurrence as a plain scan over all T steps, rows from `steps` on zeroed: autodiff is the reference."""
  def step(state, x):
    (x_r, x_z, x_n), (u_r, u_z, u_n), (m_r, m_z, m_n) = x, kernels, masks
    r = jax.nn.sigmoid(x_r + (state * m_r) @ u_r)
    z = jax.nn.sigmoid(x_z + (state * m_z) @ u_z)
    n = jnp.tanh(x_n + r * ((state * m_n) @ u_n))
    state = (1 - z) * n + z * state
    return state, state

  states = jax.lax.scan(step, jnp.zeros(inputs[0].shape[1:]), inputs)[1]
  return states * (jnp.arange(len(states)) < steps)[:, None, None]


@pytest.mark.parametrize("steps", [1, 4, 6])
def test_gru_recurrence_and_its_gradient_equal_autodiff_of_a_scan_up_to_steps(steps):
  t, b, h = 6, 3, 5
  inputs = tuple(_normal(t, b, h, seed=s) for s in range(3))
  kernels = tuple(0.5 * _normal(h, h, seed=s) for s in range(3, 6))
  masks = tuple((np.random.default_rng(s).random((b, h)) > 0.25).astype(np.float32) / 0.75 for s in range(6, 9))
  weights = _normal(t, b, h, seed=9)  # a cotangent on every state
  loss = lambda fn: lambda inputs, kernels: (fn(inputs, kernels, masks, steps) * weights).sum()
  ours = lambda inputs, kernels, masks, steps: recurrence.gru_states(jnp.float32, inputs, kernels, masks,
                                                                      jnp.asarray(steps))
  np.testing.assert_allclose(ours(inputs, kernels, masks, steps), _scan_gru_states(inputs, kernels, masks, steps),
                             atol=1e-6)
  expected = jax.grad(loss(_scan_gru_states), argnums=(0, 1))(inputs, kernels)
  actual = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(inputs, kernels)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- HVSA Model


@pytest.fixture(name="tiny_hvsa", scope="module")
def _tiny_hvsa():
  images = _normal(4, 32, 32, 3)
  tokens = np.array([[1, 2, 3], [4, 5, 0], [6, 0, 0], [0, 0, 0]], np.int32)
  lengths = np.array([3, 2, 1, 0], np.int32)
  init = jax.jit(functools.partial(hvsa.Model(**TINY_HVSA).init, train=False))
  # An rbg key: threefry's per-parameter random bits make this init compile several times slower on CPU.
  return init(jax.random.key(1, impl="rbg"), images, tokens, lengths), (images, tokens, lengths)


def test_model_initialises_like_torch(tiny_hvsa):
  variables, _ = tiny_hvsa
  params = variables["params"]
  assert set(params) == {"resnet", "kea", "image_fc", "skipthoughts", "text_fc"}
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  conv = params["resnet"]["layer4_1"]["conv1"]["kernel"]  # 3x3x64x64: kaiming_normal with fan_out = 9 * 64
  np.testing.assert_allclose(np.std(conv), math.sqrt(2 / (9 * 64)), rtol=0.02)
  np.testing.assert_array_equal(params["resnet"]["layer4_1"]["bn1"]["scale"], 1)
  np.testing.assert_array_equal(params["resnet"]["layer4_1"]["bn1"]["bias"], 0)
  assert np.abs(params["text_fc"]["kernel"]).max() <= 1 / math.sqrt(HIDDEN)


@functools.cache
def _jitted_apply(dtype=jnp.float32, **kwargs):
  return jax.jit(functools.partial(hvsa.Model(**TINY_HVSA, dtype=dtype).apply, **kwargs))


def test_model_end_to_end(tiny_hvsa):
  variables, (images, tokens, lengths) = tiny_hvsa
  train_apply = _jitted_apply(train=True, mutable=("batch_stats",))
  out, updates = train_apply(variables, images, tokens, lengths, rngs={"dropout": jax.random.key(2)})
  for name in ("image_embedding", "text_embedding"):
    assert out[name].shape == (4, 16) and out[name].dtype == jnp.float32
  assert (out["text_embedding"] >= 0).all()
  assert not np.allclose(updates["batch_stats"]["kea"]["bn"]["mean"], variables["batch_stats"]["kea"]["bn"]["mean"])

  both = _jitted_apply(train=False)(variables, images, tokens, lengths)
  images_only = _jitted_apply(train=False, method="embed_images")(variables, images)
  texts_only = _jitted_apply(train=False, method="embed_texts")(variables, tokens, lengths)
  np.testing.assert_array_equal(images_only, both["image_embedding"])
  np.testing.assert_array_equal(texts_only, both["text_embedding"])


def test_model_in_bfloat16_returns_float32_close_to_float32(tiny_hvsa):
  variables, inputs = tiny_hvsa
  out32 = _jitted_apply(train=False)(variables, *inputs)
  out16 = _jitted_apply(jnp.bfloat16, train=False)(variables, *inputs)
  for name in ("image_embedding", "text_embedding"):
    assert out16[name].dtype == jnp.float32
    np.testing.assert_allclose(out16[name], out32[name], atol=0.03)
    np.testing.assert_allclose(np.diag(hvsa.cosine_similarity(out16[name], out32[name])), 1, atol=1e-3)


def test_score_is_the_reference_cosine_and_chunks():
  images = _normal(6, 8, seed=0)
  texts = np.maximum(_normal(10, 8, seed=1), 0)
  texts[3] = 0  # a ReLU text embedding can be all zero: its scores are 0, not NaN
  norms = np.linalg.norm(images, axis=1)[:, None] * np.linalg.norm(texts, axis=1)[None, :]
  expected = images.astype(np.float64) @ texts.T / np.maximum(norms, 1e-8)

  score = functools.partial(hvsa.Model(**TINY_HVSA).apply, {}, method="score")
  scores = score(images, texts)
  assert scores.shape == (6, 10)
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  chunked = np.block([[score(images[i:i + 4], texts[j:j + 3]) for j in range(0, 10, 3)] for i in range(0, 6, 4)])
  np.testing.assert_allclose(chunked, scores, rtol=1e-6)


@pytest.mark.parametrize("block", [1, 3, 7, 10])
def test_map_in_blocks_equals_one_call_over_all_rows(block):
  rows = {"a": jnp.arange(21.0).reshape(7, 3), "b": jnp.arange(7.0)}
  fn = lambda tree: {"sum": tree["a"].sum(-1) * tree["b"], "pair": tree["a"][:, :2] + tree["b"][:, None]}
  got = layers.map_in_blocks(fn, rows, block)
  want = fn(rows)
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
