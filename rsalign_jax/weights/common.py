"""Shared machinery of the weight importers: read a PyTorch-format state dict, map it key by key onto Flax params.

API (importers in `rsalign_jax.weights.<family>` build on exactly this):
- `load_state_dict(path, candidates=...)`: `.safetensors` (safetensors.numpy), `.bin/.pt/.pth/.ckpt` (torch.save
  files, read without torch by `torch_files`, as safely as weights_only=True), or a directory holding one of
  `candidates` (sharded HF `*.index.json` too) -> {key: float32/int numpy array}. Training checkpoints
  `{"state_dict": ...}` are unwrapped and a DDP `module.` prefix is stripped.
- `Rule(target, sources, transform)`: one Flax leaf (a '/'-joined path) computed from one or more state-dict keys;
  `linear_kernel`, `conv_kernel`, `chunk` are the usual torch -> Flax layout transforms.
- `convert(state_dict, rules, expected=None, ignore=(), what=...)` -> {target path: array}. Every problem is
  collected and raised together as a `WeightsMismatchError` that names each key: keys the rules need but the
  checkpoint lacks (missing), checkpoint keys no rule uses and no `ignore` regex matches (unexpected), converted
  shapes that differ from `expected` (mismatch), rule targets absent from `expected`, and `expected` leaves no rule
  fills. `expected` is a flat or nested tree of arrays / ShapeDtypeStructs (only `.shape` is read).
- `flatten(tree)` / `unflatten(flat)`: nested dicts <-> {'a/b/c': leaf}.
- `init_params(params, init)`: the trainer hook for `config.init` (see its docstring).
Loaders registered for `init_params` are functions `load(checkpoint, expected=None, **kwargs) -> {path: array}`
living in `rsalign_jax.weights.<module>` and named in config as `format='<module>.<function>'`.
"""
import dataclasses
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from rsalign_jax.weights import torch_files

HF_CANDIDATES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_LISTED = 20


class WeightsMismatchError(ValueError):
  """A checkpoint does not fit the model: the message lists every missing / unexpected / mis-shaped key."""


# ------------------------------------------------------------------------------------------------ state dicts

def load_state_dict(path: str, candidates: Sequence[str] = HF_CANDIDATES) -> dict[str, np.ndarray]:
  """Reads a PyTorch-format state dict from a file or a directory (first of `candidates` found) as numpy arrays.

  Floating arrays come back as float32 (fp16/bf16 checkpoints included); non-array entries are dropped.
  """
  if os.path.isdir(path):
    for name in candidates:
      if os.path.exists(os.path.join(path, name)):
        return load_state_dict(os.path.join(path, name))
    raise FileNotFoundError(f"{path}: directory holds none of the expected weight files {list(candidates)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
  if path.endswith(".index.json"):
    return _load_sharded(path)
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  if path.endswith(_TORCH_SUFFIXES):
    return _load_torch(path)
  raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, one of {_TORCH_SUFFIXES}, "
                   "a *.index.json of shards, or a directory")


def _load_sharded(index_path):
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index_path}: expected a JSON object with a 'weight_map' of key -> shard file")
  state = {}
  for shard in sorted(set(weight_map.values())):
    state.update(load_state_dict(os.path.join(os.path.dirname(index_path), shard)))
  return state


def _load_safetensors(path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  state = {}
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      state[key] = _as_numpy(f.get_tensor(key))
  return state


def _load_torch(path):
  obj = torch_files.load(path)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (a mapping of name -> tensor), got {type(obj).__name__}")
  state = {key: _as_numpy(value) for key, value in obj.items() if isinstance(value, np.ndarray)}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def _as_numpy(array):
  array = np.asarray(array)
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V" else array


# ------------------------------------------------------------------------------------------------ conversion

@dataclasses.dataclass(frozen=True)
class Rule:
  """Flax leaf `target` ('/'-joined path) = `transform(*state_dict[sources])` (identity for one source)."""
  target: str
  sources: str | tuple[str, ...]
  transform: Callable[..., np.ndarray] | None = None

  @property
  def keys(self) -> tuple[str, ...]:
    return (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return weight.T


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
  return weight.transpose(2, 3, 1, 0)


def chunk(index: int, parts: int, then: Callable[[np.ndarray], np.ndarray] | None = None):
  """A transform taking part `index` of `parts` equal slices along axis 0 (e.g. q/k/v of a fused in_proj)."""
  def transform(array):
    if array.shape[0] % parts:
      raise WeightsMismatchError(f"cannot split axis 0 of shape {array.shape} into {parts} equal parts")
    size = array.shape[0] // parts
    part = array[index * size:(index + 1) * size]
    return then(part) if then else part
  return transform


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, object]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def convert(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule], expected: Mapping | None = None,
            ignore: Sequence[str] = (), what: str = "checkpoint") -> dict[str, np.ndarray]:
  """Applies `rules` to `state_dict`; raises one `WeightsMismatchError` listing every problem (module docstring)."""
  expected_flat = None if expected is None else flatten(expected)
  missing = sorted({k for rule in rules for k in rule.keys if k not in state_dict})
  used = {k for rule in rules for k in rule.keys}
  unexpected = sorted(k for k in state_dict if k not in used and not any(re.fullmatch(p, k) for p in ignore))
  out, mismatched, not_in_model = {}, [], []
  for rule in rules:
    if any(k not in state_dict for k in rule.keys):
      continue
    arrays = [state_dict[k] for k in rule.keys]
    if rule.transform is None and len(arrays) != 1:
      raise ValueError(f"rule for {rule.target!r}: {len(arrays)} sources need a transform")
    value = np.asarray(rule.transform(*arrays) if rule.transform else arrays[0])
    source = ", ".join(repr(k) for k in rule.keys)
    if expected_flat is not None:
      if rule.target not in expected_flat:
        not_in_model.append(f"{rule.target!r} (from {source})")
        continue
      want = tuple(expected_flat[rule.target].shape)
      if value.shape != want:
        got = ", ".join(str(tuple(a.shape)) for a in arrays)
        mismatched.append(f"{source} {got} -> {rule.target!r} {value.shape}, model expects {want}")
        continue
    out[rule.target] = value
  uncovered = [] if expected_flat is None else sorted(
      p for p in expected_flat if p not in {r.target for r in rules})
  problems = [("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
              ("shape mismatch", mismatched), ("not in the model", not_in_model),
              ("model parameters the checkpoint does not provide", uncovered)]
  if any(items for _, items in problems):
    raise WeightsMismatchError(f"{what} does not match the model:\n" + "\n".join(
        _listing(title, items) for title, items in problems if items))
  return out


_log = logging.getLogger(__name__)  # a stdlib logger: absl's root handler prints it, pytest's caplog sees it


def log_unused(state_dict: Mapping[str, np.ndarray], patterns: Sequence[str], what: str) -> list[str]:
  """Logs (and returns) the checkpoint keys that `patterns` mark as known to be unused by the model."""
  unused = sorted(k for k in state_dict if any(re.fullmatch(p, k) for p in patterns))
  if unused:
    _log.info("%s: %d checkpoint entries not used by the model: %s", what, len(unused), ", ".join(unused))
  return unused


def _listing(title, items):
  shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"  {title} ({len(items)}):\n{shown}{more}"


# ------------------------------------------------------------------------------------------------ trainer hook

def init_params(params: Mapping, init: Mapping | None) -> dict:
  """Returns `params` with subtrees replaced by imported checkpoints.

  `params` is any nested dict of arrays; the trainer passes its variables {'params': {'model': ..., 'objective':
  ...}, 'batch_stats': ...}, so `into` paths start with 'params/' (or '' for a loader that also fills BatchNorm
  statistics). `init` (the config's `init`) maps entry names to dicts: `format` ('<module>.<function>' resolved in
  `rsalign_jax.weights`, e.g. 'clip.load_open_clip'), `checkpoint` (a path), `into` ('/'-path of the subtree the
  loader fills, '' for the whole tree), and any further keys as loader kwargs. An entry with an empty checkpoint
  is skipped. The loader gets `expected` = that subtree; each returned array replaces the leaf at that path
  (cast to its dtype, placed with its sharding). Other leaves keep their values.
  """
  flat = flatten(params)
  for name, entry in dict(init or {}).items():
    entry = dict(entry)
    fmt, checkpoint, into = entry.pop("format", ""), entry.pop("checkpoint", ""), entry.pop("into", "")
    if not checkpoint:
      continue
    loader = _resolve_loader(name, fmt)
    prefix = f"{into}/" if into else ""
    expected = unflatten({p[len(prefix):]: v for p, v in flat.items() if p.startswith(prefix)})
    if not expected:
      raise ValueError(f"init.{name}.into={into!r}: no such parameter subtree; top-level: {sorted(params)}")
    for path, value in loader(checkpoint, expected=expected, **entry).items():
      full = prefix + path
      if full not in flat:
        raise WeightsMismatchError(f"init.{name}: loader produced {full!r}, which is not a model parameter")
      old = flat[full]
      if tuple(old.shape) != tuple(np.shape(value)):
        raise WeightsMismatchError(f"init.{name}: {full!r} has shape {np.shape(value)}, model expects {old.shape}")
      value = np.asarray(value, dtype=old.dtype)
      flat[full] = jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else value
  return _rebuild(params, flat)


def _rebuild(tree, flat, prefix=""):
  """`tree`'s structure (empty subtrees included) with leaves from `flat`."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    out[key] = _rebuild(value, flat, path) if isinstance(value, Mapping) else flat[path]
  return out


def _resolve_loader(name, fmt):
  module_name, _, function = fmt.rpartition(".")
  if not module_name:
    raise ValueError(f"init.{name}.format={fmt!r}: expected '<module>.<function>' of rsalign_jax.weights, "
                     "e.g. 'clip.load_open_clip'")
  try:
    module = importlib.import_module(f"rsalign_jax.weights.{module_name}")
  except ModuleNotFoundError:
    raise ValueError(f"init.{name}.format={fmt!r}: no module rsalign_jax.weights.{module_name}") from None
  if not callable(getattr(module, function, None)):
    raise ValueError(f"init.{name}.format={fmt!r}: rsalign_jax.weights.{module_name} has no loader {function!r}")
  return getattr(module, function)
