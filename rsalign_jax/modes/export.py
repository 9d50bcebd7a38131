"""`--mode=export`: a split's image and caption embeddings with their ids, for search and for other tools.

Writes to an output directory:
- `image_embeddings.npy` (images, ...) and `caption_embeddings.npy` (captions, ...) float32, one row per image /
  caption in split order (a model whose embeddings are a dict writes one `<kind>_embeddings.<key>.npy` per key);
  L2-normalised when the model scores by cosine (`SCORE = 'cosine'`), so an inner-product index ranks as it does;
- for hashing models (`image_codes`/`text_codes` methods, CCLS2T), `image_codes.npy` / `caption_codes.npy`: the
  sign codes packed 32 bits per uint32 word (`hash_index.pack_codes`);
- `manifest.json`: what produced it (model, dataset, split, checkpoint), `score` ('inner_product' of the normalised
  rows, or 'model': only the model's own `score` ranks them) and the rows: image ids and filenames, caption texts
  and the row of each caption's image;
- with pyarrow installed, `images.parquet` and `captions.parquet` (ids, filenames / texts, embedding lists) for
  (N, D) embeddings.
Embeddings are computed in global batches sharded over the devices and streamed into memory-mapped .npy files:
host memory holds the split's captions and ids and one batch of embeddings, never all of them.
"""
import json
import os

import jax
import numpy as np

from rsalign_jax.serving import embedding
from rsalign_jax.serving import hash_index
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.runtime import metric_writer

FORMAT = "rsalign_jax.export/1"
KINDS = ("image", "caption")


def export(config, workdir, *, checkpoint="", split="", output_dir=""):
  """Exports `split` (default: the test split) to `output_dir` (default WORKDIR/export_<split>); returns the
  manifest."""
  loaded = trained_lib.load(config, workdir, checkpoint)
  split = split or config.dataset.test_split
  output_dir = output_dir or os.path.join(workdir, f"export_{split}")
  with jax.set_mesh(loaded.setup.mesh):
    manifest = write(loaded, loaded.setup.split(split), output_dir)
  metric_writer.log("exported %d images and %d captions of %s (%s) to %s", len(manifest["images"]["filename"]),
                    len(manifest["captions"]["text"]), split, loaded.checkpoint, output_dir)
  return manifest


def write(loaded, data, output_dir):
  """Embeds every image and caption of `data` into `output_dir` (see the module docstring)."""
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(output_dir, exist_ok=True)
  setup, variables = loaded.setup, loaded.variables
  batches = {"image": lambda: embedding.image_batches(setup, data),
             "caption": lambda: embedding.text_batches(setup, data.tokens, data.lengths, data.text_fields,
                                                       f"{data.name} captions")}
  towers = {"image": "images", "caption": "texts"}
  code_towers = {"image": "image_codes", "caption": "text_codes"}
  counts = {"image": data.index.num_images, "caption": len(data.index.captions)}
  files, code_bits = {}, {}
  cosine = setup.model.SCORE == "cosine"
  for kind in KINDS:
    rows = embedding.embed(setup, variables, towers[kind], batches[kind]())
    files[f"{kind}_embeddings"] = _write_npy(output_dir, f"{kind}_embeddings", counts[kind], primary,
                                             map(_unit_rows, rows) if cosine else rows)
    if setup.model.HASH_CODES:
      codes = embedding.embed(setup, variables, code_towers[kind], batches[kind]())
      files[f"{kind}_codes"] = _write_npy(output_dir, f"{kind}_codes", counts[kind], primary,
                                          _packed(codes, code_bits))
  config = loaded.config
  manifest = {
      "format": FORMAT, "model": config.model_name, "dataset": config.dataset.name, "split": data.name,
      "checkpoint": loaded.checkpoint, "step": loaded.step, "files": files, "code_bits": code_bits.get("bits"),
      "score": "inner_product" if cosine else "model",
      "images": {"image_id": data.index.image_ids.tolist(), "filename": list(data.index.filenames)},
      "captions": {"text": list(data.index.captions), "image_row": data.index.record.tolist()},
  }
  if primary:
    with open(os.path.join(output_dir, "manifest.json"), "w") as f:
      json.dump(manifest, f)
    _write_parquet(output_dir, manifest)
  return manifest


def read(export_dir):
  """(manifest, {file key: memory-mapped array or dict of them}) of an export directory."""
  path = os.path.join(export_dir, "manifest.json")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"--gallery={export_dir}: no manifest.json; create one with --mode=export") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  arrays = {key: _load(export_dir, names) for key, names in manifest["files"].items()}
  return manifest, arrays


def _load(export_dir, names):
  if isinstance(names, str):
    return np.load(os.path.join(export_dir, names), mmap_mode="r")
  return {key: np.load(os.path.join(export_dir, name), mmap_mode="r") for key, name in names.items()}


def _write_npy(output_dir, stem, rows, primary, batches):
  """Streams batches (arrays or dicts of arrays) into .npy memmaps; returns the file name (or {key: name})."""
  files, start = None, 0
  for batch in batches:
    leaves = batch if isinstance(batch, dict) else {None: batch}
    if files is None:
      names = {key: f"{stem}.npy" if key is None else f"{stem}.{key}.npy" for key in leaves}
      files = {key: _open(output_dir, names[key], (rows,) + value.shape[1:], value.dtype, primary)
               for key, value in leaves.items()}
    for key, value in leaves.items():
      if primary:
        files[key][start:start + len(value)] = value
    start += len(next(iter(leaves.values())))
  for array in files.values():
    if primary:
      array.flush()
  return names[None] if None in names else names


def _unit_rows(batch):
  """(rows, D) embeddings scaled to unit L2 norm (cosine's epsilon for an all-zero row)."""
  batch = np.asarray(batch, np.float32)
  return batch / np.maximum(np.linalg.norm(batch, axis=-1, keepdims=True), 1e-8)


def _open(output_dir, name, shape, dtype, primary):
  if not primary:
    return None
  return np.lib.format.open_memmap(os.path.join(output_dir, name), mode="w+", dtype=dtype, shape=shape)


def _packed(codes, code_bits):
  """Packs batches of (rows, K) relaxed codes into sign bits, noting K in `code_bits['bits']`."""
  for batch in codes:
    code_bits["bits"] = int(batch.shape[1])
    yield hash_index.pack_codes(batch)


def _write_parquet(output_dir, manifest, rows_per_group=65536):
  """images.parquet / captions.parquet with ids and (N, D) embeddings as float32 lists, when pyarrow is installed."""
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top  (optional dependency)
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  columns = {"image": {"row": np.arange(len(manifest["images"]["image_id"])), **manifest["images"]},
             "caption": {"row": np.arange(len(manifest["captions"]["text"])), **manifest["captions"]}}
  for kind in KINDS:
    name = manifest["files"][f"{kind}_embeddings"]
    if not isinstance(name, str):
      continue
    embeddings = np.load(os.path.join(output_dir, name), mmap_mode="r")
    if embeddings.ndim != 2:
      continue
    writer = None
    for start in range(0, len(embeddings), rows_per_group):
      stop = start + rows_per_group
      table = {key: pa.array(np.asarray(value[start:stop])) for key, value in columns[kind].items()}
      flat = pa.array(np.ascontiguousarray(embeddings[start:stop], np.float32).reshape(-1))
      table["embedding"] = pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])
      table = pa.table(table)
      writer = writer or pq.ParquetWriter(os.path.join(output_dir, f"{kind}s.parquet"), table.schema)
      writer.write_table(table)
    writer.close()
