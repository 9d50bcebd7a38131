"""The method contract (rsalign_jax/models/base.py, rsalign_jax/losses/base.py): every shipped method keeps it,
breaches are clear errors, the batch fields come from the declarations, and a method defined only in this file
trains, evaluates, exports and searches through the unchanged trainer and modes."""
import pkgutil
import sys
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rsalign_jax.losses
import rsalign_jax.models
from helpers import runlocal_config
from rsalign_jax import experiment, train
from rsalign_jax.losses import base as objective_base
from rsalign_jax.models import base as model_base
from rsalign_jax.modes import evaluate, export, search
from rsalign_jax.modes import trained as trained_lib


def modules_defining(package, name):
  return [info.name for info in pkgutil.iter_modules(package.__path__)
          if hasattr(__import__(f"{package.__name__}.{info.name}", fromlist=[name]), name)]


def test_every_shipped_model_and_objective_keeps_the_contract():
  models = modules_defining(rsalign_jax.models, "Model")
  objectives = modules_defining(rsalign_jax.losses, "Objective")
  assert {"hvsa", "amfmn", "ccnet", "ssjdn", "ccls2t", "dual_encoder"} <= set(models)
  assert {"hvsa", "amfmn", "ccnet", "ssjdn", "ccls2t", "clip", "vsepp"} <= set(objectives)
  for name in models:
    assert issubclass(model_base.model_class(name), model_base.RetrievalModel)
  for name in objectives:
    assert issubclass(objective_base.objective_class(name), objective_base.Objective)


def test_a_model_that_breaks_its_declarations_fails_when_defined():
  members = dict(embed_images=lambda self, images, *, train: images, score=lambda self, a, b: a @ b.T,
                 __call__=lambda self, images, tokens, lengths, *, train: {})
  with pytest.raises(TypeError, match=r"NoText does not define \['embed_texts'\]"):
    type("NoText", (model_base.RetrievalModel,), dict(members))
  complete = dict(members, embed_texts=lambda self, tokens, lengths, *, train: tokens)
  with pytest.raises(TypeError, match=r"Hashless does not define \['image_codes', 'text_codes'\]"):
    type("Hashless", (model_base.RetrievalModel,), dict(complete, HASH_CODES=True))
  with pytest.raises(TypeError, match=r"Trunkless does not define \['text_trunk'\]"):
    type("Trunkless", (model_base.RetrievalModel,), dict(complete, TRUNKS=("text",)))
  with pytest.raises(TypeError, match=r"Audio.TRUNKS: \['audio'\] not in \('image', 'text'\)"):
    type("Audio", (model_base.RetrievalModel,), dict(complete, TRUNKS=("audio",)))


def test_names_that_do_not_keep_the_contract_are_clear_errors():
  with pytest.raises(TypeError, match=r"model_name='layers': rsalign_jax/models/layers.py has no Model subclassing"):
    model_base.model_class("layers")
  with pytest.raises(TypeError, match=r"loss_name='triplet': rsalign_jax/losses/triplet.py has no Objective"):
    objective_base.objective_class("triplet")


@pytest.mark.parametrize("name, arg, expected", [
    ("hvsa", "runlocal", ()), ("amfmn", "runlocal", ()), ("amfmn", "runlocal,dynamic", ("caption_set",)),
    ("ccnet", "runlocal", ("scene",)), ("ssjdn", "runlocal", ("scene",)),
    ("ccls2t", "runlocal", ("scene", "spacetime"))])
def test_batch_fields_are_the_model_and_objective_declarations(tmp_path_factory, name, arg, expected):
  config = runlocal_config(tmp_path_factory, name, arg)
  model, objective = experiment.build_model(config, vocab_size=50), experiment.build_objective(config)
  assert experiment.batch_fields(config, model, objective) == expected


def test_the_retired_input_fields_setting_is_refused(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, "ccnet")
  config.input.fields = ("scene",)
  with pytest.raises(ValueError, match="input.fields: no longer read; a batch carries the fields the model"):
    experiment.batch_fields(config, experiment.build_model(config, 50), experiment.build_objective(config))


def cosine_scores(images, texts):
  normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return normalise(images) @ normalise(texts).T


class PooledPixels(model_base.RetrievalModel):
  """A method that exists only in this test: 4x4-pooled pixels and mean word embeddings, linearly projected."""
  vocab_size: int
  embed_dim: int = 16
  dtype: Any = jnp.float32

  def setup(self):
    self.image_projection = nn.Dense(self.embed_dim)
    self.words = nn.Embed(self.vocab_size, self.embed_dim)

  def embed_images(self, images, *, train):
    b, h, w, c = images.shape
    pooled = images.reshape(b, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4))
    return self.image_projection(pooled.reshape(b, -1))

  def embed_texts(self, tokens, lengths, *, train):
    mask = (jnp.arange(tokens.shape[1]) < lengths[:, None])[..., None]
    return (self.words(tokens) * mask).sum(1) / jnp.maximum(lengths[:, None], 1)

  def score(self, image_embedding, text_embedding):
    return cosine_scores(image_embedding, text_embedding)

  def __call__(self, images, tokens, lengths, *, train):
    return dict(images=self.embed_images(images, train=train), texts=self.embed_texts(tokens, lengths, train=train))


class SymmetricInfoNCE(objective_base.Objective):
  """InfoNCE over the global batch, captions of the same image counted as positives."""
  temperature: float = 0.1

  def __call__(self, outputs, batch):
    logits = cosine_scores(outputs["images"], outputs["texts"]) / self.temperature
    positives = batch["image_id"][:, None] == batch["image_id"][None, :]
    log_p = lambda l: jax.nn.log_softmax(l, axis=1)
    loss = -(jnp.sum(log_p(logits) * positives) + jnp.sum(log_p(logits.T) * positives)) / (2 * positives.sum())
    return loss, {"positive_score": jnp.sum(logits * positives) / positives.sum() * self.temperature}


def test_a_method_defined_only_here_trains_evaluates_exports_and_searches(tmp_path_factory, monkeypatch):
  monkeypatch.setitem(sys.modules, "rsalign_jax.models.pooled_pixels", types.SimpleNamespace(Model=PooledPixels))
  monkeypatch.setitem(sys.modules, "rsalign_jax.losses.symmetric_infonce",
                      types.SimpleNamespace(Objective=SymmetricInfoNCE))
  config = runlocal_config(tmp_path_factory)
  config.model_name, config.model, config.loss_name, config.loss = "pooled_pixels", {}, "symmetric_infonce", {}
  config.optimizer.lr = 3e-2
  workdir = tmp_path_factory.mktemp("pooled_pixels")

  results = train.train_and_evaluate(config, str(workdir))
  assert results["model"] == "pooled_pixels" and results["loss"] == "symmetric_infonce"
  assert results["test"]["rsum"] > results["random_init"]["rsum"]
  assert evaluate.evaluate(config, str(workdir))["metrics"] == results["test"]
  manifest = export.export(config, str(workdir), output_dir=str(workdir / "export"))
  assert np.load(workdir / "export" / "image_embeddings.npy").shape == (len(manifest["images"]["filename"]), 16)
  loaded = trained_lib.load(config, str(workdir))
  with jax.set_mesh(loaded.setup.mesh):
    gallery = search.load_gallery(loaded)
    [result] = search.text_to_images(loaded, gallery, [gallery.captions[0]], 3)
  assert [r["rank"] for r in result["results"]] == [1, 2, 3]


@pytest.mark.parametrize("name, fields", [("hvsa", {}), ("ssjdn", {}), ("ccls2t", {"spacetime": False}),
                                          ("dual_encoder", {})])
def test_a_cosine_scoring_model_scores_by_the_cosine_of_its_embeddings(name, fields):
  model = model_base.model_class(name)(vocab_size=10, **fields)
  assert model.SCORE == "cosine"
  images, texts = jax.random.normal(jax.random.key(0), (5, 8)), jax.random.normal(jax.random.key(1), (7, 8))
  scores = model.apply({}, images, texts, method="score")
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(scores, unit(np.asarray(images)) @ unit(np.asarray(texts)).T, rtol=1e-5, atol=1e-6)


def test_score_must_be_declared_as_one_of_the_known_kinds():
  members = dict(embed_images=lambda self, images, *, train: images, embed_texts=lambda self, t, l, *, train: t,
                 score=lambda self, a, b: a @ b.T, __call__=lambda self, images, tokens, lengths, *, train: {})
  with pytest.raises(TypeError, match=r"Dotted.SCORE='dot': expected one of \('cosine', 'model'\)"):
    type("Dotted", (model_base.RetrievalModel,), dict(members, SCORE="dot"))


def test_a_misspelt_model_or_loss_name_is_one_error_naming_the_module():
  with pytest.raises(ValueError, match=r"^model_name='hvssa': no module rsalign_jax/models/hvssa.py$"):
    model_base.model_class("hvssa")
  with pytest.raises(ValueError, match=r"^loss_name='clipp': no module rsalign_jax/losses/clipp.py$"):
    objective_base.objective_class("clipp")
