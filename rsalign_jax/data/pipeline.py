"""The training input pipeline: a seeded global order of (image, caption) items, each process loading only its rows.

The order depends only on (seed, epoch), never on the number of processes or devices: global batch s holds items
`perm_epoch[s*B : (s+1)*B]` (epochs run back to back) and process p loads rows [p*b, (p+1)*b) of it, b = B/P.
So 1 process x 8 devices and 2 processes x 4 devices see the same global batches, and augmentation randomness is
seeded by the global position, not by the worker or process that happens to load it.
The grain iterator state (the last position read) checkpoints through JSON and resumes at the exact next batch.
"""
import functools

import grain
import numpy as np

from rsalign_jax.data import fields as fields_lib
from rsalign_jax.data import preprocessing

SAMPLING_MODES = ("per_caption", "per_image")
_EPOCHS_AHEAD = 10**6  # the loader is effectively infinite; training stops by step count


class TrainItems:
  """Random-access view: local position k -> the item at this process's row of its global batch."""

  def __init__(self, source, index, tokens, lengths, *, sampling, global_batch_size, process_index,
               process_count, seed, name, fields=()):
    if sampling not in SAMPLING_MODES:
      raise ValueError(f"input.sampling={sampling!r}: expected one of {SAMPLING_MODES}")
    if global_batch_size % process_count:
      raise ValueError(f"input.batch_size={global_batch_size} is not divisible by {process_count} processes")
    self._source = source
    self._tokens, self._lengths = tokens, lengths
    self._record_of_caption = index.record
    if sampling == "per_caption":
      self._captions_of_item = [np.array([k]) for k in range(len(index.captions))]
      self._record_of_item = index.record
    else:
      starts = np.searchsorted(index.record, np.arange(index.num_images + 1))
      self._captions_of_item = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
      self._record_of_item = np.arange(index.num_images)
    self._image_ids = index.image_ids
    self._image_captions = np.searchsorted(index.record, np.arange(index.num_images + 1))
    self._fields = {field: fields_lib.get(field) for field in fields}
    self._global_batch = global_batch_size
    self._local_batch = global_batch_size // process_count
    self._row_offset = process_index * self._local_batch
    self._seed = seed
    self._name = name

  @property
  def local_batch_size(self):
    return self._local_batch

  @property
  def num_items(self):
    return len(self._record_of_item)

  def __len__(self):
    return self._local_batch * (_EPOCHS_AHEAD * self.num_items // self._global_batch)

  def __repr__(self):
    # grain stores this in its iterator state and checks it on restore: it must not contain an object address.
    return f"TrainItems({self._name}, items={self.num_items}, batch={self._global_batch}, seed={self._seed})"

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch):
    return np.random.default_rng([self._seed, epoch]).permutation(self.num_items)

  def global_position(self, k):
    step, row = divmod(k, self._local_batch)
    return step * self._global_batch + self._row_offset + row

  def __getitem__(self, k):
    position = self.global_position(k)
    epoch, offset = divmod(position, self.num_items)
    item = self._permutation(epoch)[offset]
    record = self._source[int(self._record_of_item[item])]
    captions = self._captions_of_item[item]
    image = int(self._record_of_item[item])
    image_tokens = self._tokens[self._image_captions[image]:self._image_captions[image + 1]]
    return {"image": record["image"], "tokens": self._tokens[captions], "lengths": self._lengths[captions],
            "image_id": np.int32(self._image_ids[image]), "position": np.int64(position),
            **{name: function(record, image_tokens) for name, function in self._fields.items()}}


class Preprocess(grain.transforms.Map):
  """Preprocesses the image and picks one caption, with randomness seeded by (seed, global position)."""

  def __init__(self, pp_spec, seed):
    self._pp = preprocessing.parse(pp_spec)
    self._seed = seed

  def map(self, item):
    rng = np.random.default_rng([self._seed, 1, int(item["position"])])
    choice = rng.integers(len(item["lengths"]))
    fields = {k: v for k, v in item.items() if k not in ("image", "tokens", "lengths", "position")}
    return {**fields, "image": self._pp(item["image"], rng), "tokens": item["tokens"][choice],
            "lengths": item["lengths"][choice]}


def make_train_loader(items, *, pp_spec, seed, worker_count=0):
  """A grain DataLoader yielding this process's rows of each global batch, as numpy dicts."""
  sampler = grain.samplers.IndexSampler(len(items), shard_options=grain.sharding.NoSharding(), shuffle=False,
                                        num_epochs=1)
  return grain.DataLoader(data_source=items, sampler=sampler, worker_count=worker_count,
                          operations=[Preprocess(pp_spec, seed),
                                      grain.transforms.Batch(items.local_batch_size, drop_remainder=True)])
