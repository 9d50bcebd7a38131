"""SSJDN (our design): SFE/SGS/BSD, BiGRU and LSD against numpy references, the objective with unlabelled rows,
the config's class counts, and a runlocal trainer run on 8 virtual devices."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_consistent_results, load_config, runlocal_config
from rsalign_jax import train
from rsalign_jax.losses import ssjdn as ssjdn_loss
from rsalign_jax.losses import triplet
from rsalign_jax.models import ssjdn
from rsalign_jax.runtime import sharding


def _normal(*shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _randomize(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32), tree)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------- numpy references


def np_resize(maps, size):
  """(B, h, w, C) bilinear resize as torch's interpolate(mode='bilinear', align_corners=False)."""
  def matrix(n_in, n_out):
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = min(int(np.floor(src)), n_in - 1)
      a[i, i0] += 1 - (src - i0)
      a[i, min(i0 + 1, n_in - 1)] += src - i0
    return a
  rows, cols = matrix(maps.shape[1], size[0]), matrix(maps.shape[2], size[1])
  return np.einsum("Hh,bhwc,Ww->bHWc", rows, maps, cols)


def np_sfe(features, params):
  kernel, bias = params["conv"]["kernel"], params["conv"]["bias"]
  k = kernel.shape[0]
  pooled = np.stack([features.mean(-1), features.max(-1)], axis=-1)
  padded = np.pad(pooled, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  b, h, w, _ = features.shape
  logits = np.zeros((b, h, w))
  for y in range(h):
    for x in range(w):
      logits[:, y, x] = np.einsum("bijc,ijc->b", padded[:, y:y + k, x:x + k], kernel[..., 0]) + bias[0]
  saliency = _sigmoid(logits)[..., None]
  return saliency, (saliency * features).mean(axis=(1, 2))


def np_sgs(features, saliency, params):
  return features * (1 - _sigmoid(params["gamma_logit"]) * np_resize(saliency, features.shape[1:3]))


def np_bsd(features, params):
  def chain(order, direction):
    descriptors, saliency = {}, None
    for scale in order:
      x = features[scale]
      if saliency is not None:
        x = np_sgs(x, saliency, params[f"sgs_{direction}_{scale}"])
      saliency, descriptors[scale] = np_sfe(x, params[f"sfe_{direction}_{scale}"])
    return descriptors
  down, up = chain(("f4", "f3", "f2"), "down"), chain(("f2", "f3", "f4"), "up")
  return {s: down[s] + up[s] for s in ("f2", "f3", "f4")}


def np_gru(p, xs):
  """Flax GRUCell over xs (T, E) from a zero state; returns the (T, H) states."""
  def dense(name, x):
    return x @ p[name]["kernel"] + p[name].get("bias", 0.0)

  h, states = np.zeros(p["hr"]["kernel"].shape[0]), []
  for x in xs:
    r = _sigmoid(dense("ir", x) + dense("hr", h))
    z = _sigmoid(dense("iz", x) + dense("hz", h))
    n = np.tanh(dense("in", x) + r * dense("hn", h))
    h = (1 - z) * n + z * h
    states.append(h)
  return np.stack(states)


def np_bigru(params, tokens, lengths):
  rows = []
  for row, length in zip(tokens, lengths):
    length = max(int(length), 1)
    words = params["embedding"]["embedding"][row[:length]] * (row[:length] != 0)[:, None]
    outputs = (np_gru(params["forward_gru"], words) + np_gru(params["backward_gru"], words[::-1])[::-1]) / 2
    rows.append(outputs.mean(axis=0))
  return np.stack(rows)


def np_cosine(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return a @ b.T


def np_stl(images, texts, scene, ids, margin, factor, unlabelled_is_a_class=False):
  scores = np_cosine(images.astype(np.float64), texts.astype(np.float64))
  n = len(scene)

  def pair_margin(a, b):
    same = scene[a] == scene[b] and (scene[a] >= 0 or unlabelled_is_a_class)
    return margin * factor if same else margin

  total = 0.0
  for anchor in range(n):
    negatives = [j for j in range(n) if ids[j] != ids[anchor]]
    total += max([0.0] + [pair_margin(anchor, j) + scores[anchor, j] - scores[anchor, anchor] for j in negatives])
    total += max([0.0] + [pair_margin(i, anchor) + scores[i, anchor] - scores[anchor, anchor] for i in negatives])
  return total


def np_labelled_ce(logits, scene):
  logits = logits.astype(np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  rows = np.flatnonzero(scene >= 0)
  if not len(rows):
    return 0.0, 0.0
  return -np.mean(log_probs[rows, scene[rows]]), np.mean(logits[rows].argmax(1) == scene[rows])


# ---------------------------------------------------------------- SFE / SGS / BSD


@pytest.mark.parametrize("source, target", [((3, 3), (5, 5)), ((5, 5), (3, 3)), ((10, 10), (5, 5)), ((1, 1), (2, 2)),
                                            ((2, 4), (5, 3))])
def test_resize_is_torch_bilinear_without_align_corners(source, target):
  maps = _normal(2, *source, 1)
  np.testing.assert_allclose(ssjdn.resize_bilinear(maps, target), np_resize(maps, target), rtol=1e-5, atol=1e-6)


def test_sfe_matches_numpy():
  features = _normal(2, 5, 4, 3, seed=1)
  sfe = ssjdn.SalienceFeatureExtraction()
  params = _randomize(sfe.init(jax.random.key(0), features)["params"], seed=2)
  saliency, descriptor = sfe.apply({"params": params}, features)
  assert saliency.shape == (2, 5, 4, 1) and descriptor.shape == (2, 3)
  want_saliency, want_descriptor = np_sfe(features, params)
  np.testing.assert_allclose(saliency, want_saliency, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(descriptor, want_descriptor, rtol=1e-5, atol=1e-6)


def test_sgs_matches_numpy_and_starts_at_gamma_one_half():
  features, saliency = _normal(2, 5, 5, 3, seed=3), _sigmoid(_normal(2, 3, 3, 1, seed=4))
  sgs = ssjdn.SalienceGuidedSuppression()
  params = sgs.init(jax.random.key(0), features, saliency)["params"]
  assert params["gamma_logit"] == 0.0  # gamma = sigmoid(0) = 0.5
  params = {"gamma_logit": np.float32(0.7)}
  np.testing.assert_allclose(sgs.apply({"params": params}, features, saliency), np_sgs(features, saliency, params),
                             rtol=1e-5, atol=1e-6)


def test_bidirectional_chain_matches_numpy():
  features = {"f2": _normal(2, 5, 5, 3, seed=5), "f3": _normal(2, 3, 3, 3, seed=6), "f4": _normal(2, 2, 2, 3, seed=7)}
  bsd = ssjdn.BidirectionalScaleDecoupling()
  params = _randomize(bsd.init(jax.random.key(0), features)["params"], seed=8)
  # 6 SFE units; SGS only where a chain arrives from another scale.
  assert set(params) == {f"sfe_{d}_{s}" for d in ("down", "up") for s in ("f2", "f3", "f4")} | {
      "sgs_down_f3", "sgs_down_f2", "sgs_up_f3", "sgs_up_f4"}
  got, want = bsd.apply({"params": params}, features), np_bsd(features, params)
  for scale in ("f2", "f3", "f4"):
    assert got[scale].shape == (2, 3)
    np.testing.assert_allclose(got[scale], want[scale], rtol=1e-5, atol=1e-6)


def test_model_shapes_at_80px():
  model = ssjdn.Model(vocab_size=30, num_classes=21, embed_dim=24, scale_dim=8, resnet_width=8, word_dim=6,
                      hidden_dim=10)
  inputs = (jax.ShapeDtypeStruct((3, 80, 80, 3), jnp.float32), jax.ShapeDtypeStruct((3, 7), jnp.int32),
            jax.ShapeDtypeStruct((3,), jnp.int32))
  variables = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x, train=False), *inputs)
  outputs = jax.eval_shape(lambda v, *x: model.apply(v, *x, train=False), variables, *inputs)
  assert {k: v.shape for k, v in outputs.items()} == {"image_embedding": (3, 24), "text_embedding": (3, 24),
                                                      "image_logits": (3, 21), "text_logits": (3, 21)}
  params = variables["params"]
  assert {k: params[f"projections_{k}"]["kernel"].shape for k in ("f2", "f3", "f4")} == {
      "f2": (16, 8), "f3": (32, 8), "f4": (64, 8)}
  assert params["image_fc"]["kernel"].shape == (24, 24) and params["lsd"]["prototypes"].shape == (21, 24)


# ---------------------------------------------------------------- text and LSD


def test_bigru_matches_numpy_and_ignores_tokens_past_the_length():
  encoder = ssjdn.BiGRUEncoder(vocab_size=9, word_dim=4, hidden_dim=5)
  tokens = np.array([[3, 1, 4, 7, 5, 2], [2, 8, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
  lengths = np.array([4, 2, 0], np.int32)
  params = _randomize(encoder.init(jax.random.key(0), tokens, lengths, train=False)["params"], seed=9)
  got = encoder.apply({"params": params}, tokens, lengths, train=False)
  np.testing.assert_allclose(got, np_bigru(jax.device_get(params), tokens, lengths), rtol=1e-5, atol=1e-6)
  garbage = np.where(np.arange(6) >= lengths[:, None], 6, tokens)
  np.testing.assert_array_equal(encoder.apply({"params": params}, garbage, lengths, train=False)[:2], got[:2])


def test_label_prototype_attention_matches_numpy():
  x = _normal(4, 6, seed=10)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  prototypes = _normal(3, 6, seed=11)
  lsd = ssjdn.LabelSemanticDecoupling(num_classes=3, temperature=0.2)
  assert lsd.init(jax.random.key(0), x)["params"]["prototypes"].shape == (3, 6)
  final, logits = lsd.apply({"params": {"prototypes": prototypes}}, x)
  want_logits = x @ prototypes.T / 0.2
  attention = np.exp(want_logits - want_logits.max(1, keepdims=True))
  attention /= attention.sum(1, keepdims=True)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, x + attention @ prototypes, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- objective


def _batch(scene, seed=12, classes=4):
  n = len(scene)
  outputs = {"image_embedding": _normal(n, 5, seed=seed), "text_embedding": _normal(n, 5, seed=seed + 1),
             "image_logits": _normal(n, classes, seed=seed + 2), "text_logits": _normal(n, classes, seed=seed + 3)}
  ids = np.array([0, 0] + list(range(1, n - 1)), np.int32)  # rows 0 and 1: captions of one image
  return outputs, {"scene": np.asarray(scene, np.int32), "image_id": ids}


@pytest.mark.parametrize("impl", ["global", "gather", "ring"])
def test_objective_matches_numpy_with_unlabelled_rows(impl):
  scene = np.array([0, 0, 1, -1, -1, 2, 1, -1], np.int32)
  outputs, batch = _batch(scene)
  objective = ssjdn_loss.Objective(margin=0.2, same_label_factor=0.5, class_weight=0.7, impl=impl)
  with jax.set_mesh(sharding.make_mesh()):
    loss, metrics = jax.jit(lambda o, b: objective.apply({}, o, b))(outputs, batch)
  args = (outputs["image_embedding"], outputs["text_embedding"], scene, batch["image_id"], 0.2, 0.5)
  stl = np_stl(*args)
  assert abs(stl - np_stl(*args, unlabelled_is_a_class=True)) > 1e-3  # the batch tells the two readings apart
  ce_image, accuracy_image = np_labelled_ce(outputs["image_logits"], scene)
  ce_text, accuracy_text = np_labelled_ce(outputs["text_logits"], scene)
  np.testing.assert_allclose(metrics["stl"], stl, rtol=1e-5)
  np.testing.assert_allclose([metrics["ce_image"], metrics["ce_text"]], [ce_image, ce_text], rtol=1e-5)
  np.testing.assert_allclose([metrics["class_accuracy_image"], metrics["class_accuracy_text"]],
                             [accuracy_image, accuracy_text])
  np.testing.assert_allclose(loss, stl + 0.7 * (ce_image + ce_text), rtol=1e-5)


def test_objective_without_labels_is_plain_vse_plus_plus():
  outputs, batch = _batch([-1] * 6)
  loss, metrics = ssjdn_loss.Objective(margin=0.2, same_label_factor=0.5).apply({}, outputs, batch)
  assert metrics["ce_image"] == 0.0 and metrics["ce_text"] == 0.0
  vse = triplet.vse_loss(outputs["image_embedding"], outputs["text_embedding"], batch["image_id"], margin=0.2,
                         negatives="hardest")
  np.testing.assert_allclose(loss, vse, rtol=1e-6)


def test_objective_declares_the_scene_field():
  assert ssjdn_loss.Objective().batch_fields == ("scene",)


# ---------------------------------------------------------------- config and trainer


def test_config_classes_follow_the_dataset_and_sydney_is_refused():
  default = load_config("ssjdn")
  assert (default.dataset.name, default.model.num_classes) == ("synthetic_rs/small", 21)
  assert default.dataset.image_size == 80 and default.model.resnet_width == 32
  counts = {name: load_config("ssjdn", name).model.num_classes for name in ("rsicd", "rsitmd", "ucm")}
  assert counts == {"rsicd": 30, "rsitmd": 33, "ucm": 21}
  paper = load_config("ssjdn", "rsitmd")
  assert (paper.optimizer.name, paper.optimizer.lr, paper.input.batch_size, paper.total_epochs) == ("adam", 2e-4,
                                                                                                    128, 50)
  assert paper.schedule.to_dict() == dict(name="warmup_step_decay", warmup_epochs=0, decay_every_epochs=20,
                                          decay_factor=0.7)
  assert paper.input.pp_train == "decode|resize(278)|random_rotate(0, 90)|random_crop(256)|normalize"
  assert (paper.loss.margin, paper.loss.negatives, paper.model.embed_dim) == (0.2, "sum", 512)
  assert default.loss.negatives == "sum" and default.loss.class_weight == paper.loss.class_weight == 20.0
  with pytest.raises(ValueError, match="'sydney_captions' has none"):
    load_config("ssjdn", "sydney")


def test_runlocal_trains_on_8_devices_and_writes_results(tmp_path_factory):
  assert jax.device_count() == 8
  config = runlocal_config(tmp_path_factory, "ssjdn")  # the sharded STL is tested above
  workdir = tmp_path_factory.mktemp("ssjdn")
  results = train.train_and_evaluate(config, str(workdir))
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"] and written["model"] == "ssjdn" and written["total_steps"] == 4
  assert written["random_init"] is not None
  assert_consistent_results(written)
