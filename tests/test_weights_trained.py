"""`weights.trained`: a trained workdir's parameters as an `init` entry."""
import jax
import numpy as np
import pytest

from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.weights import common, trained


def test_load_reads_the_tested_checkpoints_parameters(trained_dual_encoder):
  config, workdir, _ = trained_dual_encoder
  restored = trained_lib.load(config, str(workdir))
  expected = common.flatten(jax.device_get(restored.state.params))
  loaded = trained.load(str(workdir))
  assert sorted(loaded) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(loaded[path], value)
  heads = trained.load(str(workdir), subtree="model/image_projection")
  assert sorted(heads) == sorted(p.removeprefix("model/image_projection/") for p in expected
                                 if p.startswith("model/image_projection/"))
  assert trained.parameter_paths(str(workdir), subtree="model/image_projection") == sorted(heads)
  assert trained.checkpoint_step_dir(str(workdir)) == trained.checkpoint_step_dir(
      trained.checkpoint_step_dir(str(workdir)))


def test_refusals_name_the_checkpoint_and_parameter(trained_dual_encoder, tmp_path):
  _, workdir, _ = trained_dual_encoder
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no trained checkpoint"):
    trained.load(str(tmp_path))
  params = trained.load(str(workdir), subtree="model")
  path = sorted(params)[0]
  with pytest.raises(common.WeightsMismatchError, match=f"at other shapes: \\[\\('{path}'"):
    trained.load(str(workdir), subtree="model", expected=common.unflatten(
        {**params, path: np.zeros(params[path].shape + (2,))}))
  with pytest.raises(common.WeightsMismatchError, match=f"not in the model: \\['{path}'\\]"):
    trained.load(str(workdir), subtree="model", expected=common.unflatten(
        {p: v for p, v in params.items() if p != path}))
  with pytest.raises(common.WeightsMismatchError, match="no params under 'model/absent'"):
    trained.load(str(workdir), subtree="model/absent")
