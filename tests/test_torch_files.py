"""The torch-free reader of `torch.save` files against `torch.load(weights_only=True)`; a real-data run without torch.

torch writes every file here (zip and legacy formats); the reader must give the same values, dtypes and containers.
The end-to-end test trains `configs/rsicd_aid150.py:mlp_heads` (frozen EfficientNet-Lite0 and BERT towers, their
trunk outputs cached) for two steps in a process where `import torch` fails, with weight packages laid out as
`python -m rsalign_jax.weights fetch --dest` installs them (random weights under the real key names: a legacy `.pth`
and a zip `pytorch_model.bin`) and the RSICD fixture dataset of test_real_datasets.
"""
import collections
import fractions
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import assert_consistent_results, write_wordpiece_vocab
from rsalign_jax.models import bert, efficientnet_lite
from rsalign_jax.weights import bert as bert_weights
from rsalign_jax.weights import common, efficientnet, torch_files
from test_real_datasets import _entry, _write_karpathy

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATS = {"zip": True, "legacy": False}  # name -> torch.save's _use_new_zipfile_serialization
SMALL_BERT = dict(model_type="bert", hidden_act="gelu", vocab_size=10, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=64, type_vocab_size=2,
                  layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# The layout transforms of the importers' rules -> the permutation back to torch's layout.
TO_TORCH_LAYOUT = {common.conv_kernel: (3, 2, 0, 1), common.linear_kernel: (1, 0)}


def _save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
  return str(path)


def _assert_same(ours, reference, where="object"):
  """`ours` (torch_files) equals `reference` (torch.load): containers, keys, dtypes and values."""
  if isinstance(reference, torch.Tensor):
    assert isinstance(ours, np.ndarray) and ours.flags.writeable, where
    reference = reference.detach()
    if reference.dtype == torch.bfloat16:
      assert ours.dtype == ml_dtypes.bfloat16, where
      np.testing.assert_array_equal(ours.astype(np.float32), reference.float().numpy(), err_msg=where)
    else:
      assert ours.dtype == reference.numpy().dtype, where
      np.testing.assert_array_equal(ours, reference.numpy(), err_msg=where)
    assert ours.shape == tuple(reference.shape), where
  elif isinstance(reference, dict):
    assert type(ours) is type(reference) and list(ours) == list(reference), where
    for key, value in reference.items():
      _assert_same(ours[key], value, f"{where}[{key!r}]")
  elif isinstance(reference, (list, tuple)):
    assert type(ours) is type(reference) and len(ours) == len(reference), where
    for i, value in enumerate(reference):
      _assert_same(ours[i], value, f"{where}[{i}]")
  else:
    assert ours == reference, where


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_dtypes_views_and_containers_equal_torch_load(tmp_path, fmt):
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  shared = torch.arange(20, dtype=torch.int64)
  obj = collections.OrderedDict(
      float32=torch.randn(3, 4), float16=torch.randn(7).half(), bfloat16=torch.randn(2, 3).bfloat16(),
      float64=torch.randn(2, dtype=torch.float64), int64=torch.tensor([-(2 ** 40), 0, 7]),
      int32=torch.tensor([[1, -2]], dtype=torch.int32), uint8=torch.tensor([0, 255], dtype=torch.uint8),
      bool=torch.tensor([True, False, True]), scalar=torch.tensor(3.5), empty=torch.zeros(0, 4),
      transposed=base.t(), column=base[:, 2], every_other=shared[1::2], window=shared[4:9], whole=shared,
      parameter=torch.nn.Parameter(torch.randn(2, 2)),
      nested={"state_dict": collections.OrderedDict(weight=base[1:3, ::2]), "step": 12, "name": "lite0"},
      sequence=[torch.ones(2), (torch.zeros(1, dtype=torch.int32), 0.5)])
  path = _save(obj, tmp_path / "mixed.pt", fmt)
  ours = torch_files.load(path)
  _assert_same(ours, torch.load(path, weights_only=True))
  assert ours["transposed"].flags.c_contiguous  # copied out of the storage, not a view into the file's bytes


def test_load_state_dict_reads_torch_files_as_float32_and_unwraps_training_checkpoints(tmp_path):
  weights = {"module.w": torch.randn(3).half(), "module.b": torch.randn(2).bfloat16(), "module.n": torch.tensor(4)}
  path = _save({"state_dict": weights, "epoch": 3}, tmp_path / "train.ckpt", "legacy")
  state = common.load_state_dict(path)
  assert {k: v.dtype for k, v in state.items()} == {"w": np.float32, "b": np.float32, "n": np.int64}
  np.testing.assert_array_equal(state["w"], weights["module.w"].float().numpy())
  np.testing.assert_array_equal(state["b"], weights["module.b"].float().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_disallowed_global_is_a_one_line_error_naming_file_and_global(tmp_path, fmt):
  path = _save({"w": torch.zeros(2), "lr": fractions.Fraction(1, 3)}, tmp_path / "odd.pth", fmt)
  with pytest.raises(ValueError) as error:
    torch_files.load(path)
  assert str(error.value) == (
      f"{path}: refusing the pickled global fractions.Fraction; only tensors, storages of "
      f"{sorted(torch_files.STORAGE_DTYPES)} and OrderedDict are read (a state dict saved with torch.save)")


def test_truncated_and_foreign_files_are_refused(tmp_path):
  path = _save({"w": torch.ones(64)}, tmp_path / "cut.pth", "legacy")
  pathlib.Path(path).write_bytes(pathlib.Path(path).read_bytes()[:-8])
  with pytest.raises(ValueError, match=rf"^{re.escape(path)}: storage '\d+' holds fewer than its 64 elements$"):
    torch_files.load(path)
  foreign = tmp_path / "notes.pth"
  foreign.write_text("not a checkpoint")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(foreign))}: neither a zip archive nor a legacy torch.save "
                                       "stream; not a PyTorch checkpoint$"):
    torch_files.load(str(foreign))


@pytest.mark.parametrize("variant", sorted(efficientnet.PACKAGES))
def test_packaged_efficientnet_weights_equal_torch_load(variant):
  try:
    path = efficientnet.packaged_checkpoint(variant)
  except FileNotFoundError:
    pytest.skip("run `python -m rsalign_jax.weights fetch`")
  _assert_same(torch_files.load(path), torch.load(path, weights_only=True))


def _random_state_dict(rules, expected, seed):
  """Random float32 torch tensors under the rules' checkpoint keys, in torch's layout of the `expected` shapes."""
  rng = np.random.default_rng(seed)
  flat = common.flatten(expected)
  state = {}
  for rule in rules:
    shape = np.shape(flat[rule.target])
    order = TO_TORCH_LAYOUT.get(rule.transform, tuple(range(len(shape))))
    values = 1 + 0.1 * rng.random(shape) if rule.target.endswith(("var", "scale")) else 0.1 * rng.normal(size=shape)
    state[rule.sources] = torch.from_numpy(values.astype(np.float32).transpose(order).copy())
  return state


def _install_weight_packages(root):
  """EfficientNet-Lite0 and MiniLM packages as `weights fetch --dest root` lays them out, with random weights."""
  width, depth = efficientnet_lite.VARIANTS["lite0"]
  lite0 = efficientnet_lite.EfficientNetLite(width_coefficient=width, depth_coefficient=depth)
  variables = jax.eval_shape(lambda: lite0.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  image_state = {}
  for seed, collection in enumerate(("params", "batch_stats")):
    rules = [rule for tag, rule in efficientnet.efficientnet_rules("lite0") if tag == collection]
    image_state.update(_random_state_dict(rules, variables[collection], seed))
  image_state["_bn0.num_batches_tracked"] = torch.tensor(5)
  lite0_dir = root / efficientnet.PACKAGES["lite0"][0] / "models"
  lite0_dir.mkdir(parents=True)
  _save(image_state, lite0_dir / "efficientnet-lite0-random.pth", "legacy")

  minilm_dir = root / bert_weights.MINILM_PACKAGE / "model"
  minilm_dir.mkdir(parents=True)
  (minilm_dir / "config.json").write_text(json.dumps(SMALL_BERT))
  write_wordpiece_vocab(minilm_dir / "vocab.txt")
  attributes = bert_weights.bert_attributes(SMALL_BERT)
  text = bert.Bert(**attributes)
  params = jax.eval_shape(lambda: text.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32),
                                            train=False))["params"]
  text_state = _random_state_dict(bert_weights.bert_rules(attributes["layers"]), params, seed=2)
  text_state["embeddings.position_ids"] = torch.arange(SMALL_BERT["max_position_embeddings"])[None]
  _save(text_state, minilm_dir / "pytorch_model.bin", "zip")
  for package in (efficientnet.PACKAGES["lite0"][0], bert_weights.MINILM_PACKAGE):
    (root / package / "__init__.py").touch()
  return lite0_dir / "efficientnet-lite0-random.pth", minilm_dir


def test_the_real_data_recipe_trains_on_a_ucm_layout_in_a_process_without_torch(tmp_path):
  """configs/frozen_trunks.py (Lite0 + MiniLM from their pip packages, cached trunks, MLP heads) on a fixture in
  UCM-Captions' published layout, without torch: it builds the dataset, computes the cache, trains and evaluates;
  then the recipe's second stage (MiniLM fine-tuned under those heads) and the ensemble of the two runs."""
  image_checkpoint, text_checkpoint = _install_weight_packages(tmp_path / "weights")
  entries = [_entry(f"{i + 1}.tif", i, "train" if i < 18 else "test", [f"scene {i} caption {k}" for k in range(5)])
             for i in range(21)]
  _write_karpathy(tmp_path / "UCM", "dataset.json", "imgs", entries, "TIFF")
  workdir, finetuned, ensemble_dir = tmp_path / "workdir", tmp_path / "finetuned", tmp_path / "ensemble"
  arg = f"ucm,views=1,image_size=32,manual_dir={tmp_path / 'UCM'},data_dir={tmp_path / 'tfds'}"
  steps = ["--config.input.batch_size=2", "--config.total_steps=2", "--config.log_every_steps=1",
           "--config.evals.random_init.enabled=False"]
  without_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'rsalign_jax.main'; "
                   "runpy.run_module('rsalign_jax.main', run_name='__main__', alter_sys=True)")
  python_path = [str(tmp_path / "weights"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path),
             XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")))

  def main(*flags):
    run = subprocess.run([sys.executable, "-c", without_torch, *flags], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run

  run = main(f"--config=configs/frozen_trunks.py:{arg}", f"--workdir={workdir}", *steps)
  # The importers read both packaged files (and only they hold these unused entries).
  assert f"{image_checkpoint}: 1 checkpoint entries not used by the model: _bn0.num_batches_tracked" in run.stderr
  assert f"{text_checkpoint}: 1 checkpoint entries not used by the model: embeddings.position_ids" in run.stderr
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {d["step"]: d["train/loss"] for d in metrics if "train/loss" in d}
  assert list(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  assert "training on cached outputs of the frozen image+text trunk(s)" in run.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["test_images"] == 3
  assert_consistent_results(results)
  main(f"--config=configs/frozen_trunks.py:{arg},finetune=text,init_from={workdir}", f"--workdir={finetuned}", *steps)
  assert_consistent_results(json.loads((finetuned / "results.json").read_text()))
  main("--mode=eval", "--ensemble", f"--members={workdir},{finetuned}", f"--workdir={ensemble_dir}")
  report = json.loads((ensemble_dir / "ensemble_test.json").read_text())
  assert report["members"] == [str(workdir), str(finetuned)]
  assert list(report["metrics"]) == ["ensemble of 2", "ensemble of 2, querybank β=10"]
  assert_consistent_results({"test": report["metrics"]["ensemble of 2"]})
