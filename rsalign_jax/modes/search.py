"""`--mode=search`: free text -> top-k images, image file -> top-k captions (or similar images), exactly.

The gallery is an export directory (`--mode=export`, memory-mapped, so it may be far larger than memory) or a
dataset split embedded on the fly. Ranking is exhaustive and exact (`evaluation.topk.exact_topk`: chunked over the
gallery, sharded over the devices) with the model's own `score`; with `codes='hamming'` a hashing model (CCLS2T)
ranks by the Hamming distance of its sign codes instead (`serving.hash_index`'s packed codes and popcount
distances, in the same chunked, sharded search; a result's `score` is then the distance, lower is better). A text
query's ground truth is every gallery image with a caption equal to it (ignoring case and spacing); an image query's
is the gallery image with its file name (targets='images') or that image's captions.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rsalign_jax.serving import embedding
from rsalign_jax.serving import gallery as gallery_lib
from rsalign_jax.serving import hash_index
from rsalign_jax.evaluation import topk
from rsalign_jax.modes import export as export_lib
from rsalign_jax.modes import trained as trained_lib

CODES = ("float", "hamming")
TARGETS = ("captions", "images")


@dataclasses.dataclass
class Gallery:
  """Embeddings (and hash codes) of a split's images and captions, with their ids."""
  split: str
  image_embeddings: object  # (images, ...) array, memmap or dict of them
  caption_embeddings: object
  image_codes: object  # (images, words) uint32 packed sign codes, or None
  caption_codes: object
  filenames: list
  image_ids: np.ndarray
  captions: list
  caption_image_row: np.ndarray
  open_data: object = None  # () -> the data.splits.Split of the gallery's records (for pictures), or None

  @functools.cached_property
  def data(self):
    if self.open_data is None:
      raise ValueError("the gallery's images are not in the config's dataset; export and search with the same "
                       "config to draw them")
    return self.open_data()

  @classmethod
  def from_split(cls, loaded, split, *, codes="float"):
    """Embeds every image and caption of `split` (and their codes for codes='hamming')."""
    setup = loaded.setup
    data = setup.split(split)

    def tower(kind):
      if kind.startswith("image"):
        return embedding.embed_all(setup, loaded.variables, kind, embedding.image_batches(setup, data))
      return embedding.embed_all(setup, loaded.variables, kind,
                                 embedding.text_batches(setup, data.tokens, data.lengths, data.text_fields))

    image_codes = caption_codes = None
    if codes == "hamming":
      image_codes, caption_codes = (hash_index.pack_codes(tower(kind)) for kind in ("image_codes", "text_codes"))
    return cls(split, tower("images"), tower("texts"), image_codes, caption_codes, list(data.index.filenames),
               data.index.image_ids, list(data.index.captions), data.index.record, lambda: data)

  @classmethod
  def from_export(cls, loaded, export_dir):
    """Reads an export of the same model (its embeddings stay on disk, memory-mapped)."""
    manifest, arrays = export_lib.read(export_dir)
    if manifest["model"] != loaded.config.model_name:
      raise ValueError(f"--gallery={export_dir} holds {manifest['model']!r} embeddings, but the config's model is "
                       f"{loaded.config.model_name!r}; export the gallery with the same config")
    same_dataset = manifest["dataset"] == loaded.config.dataset.name
    return cls(manifest["split"], arrays["image_embeddings"], arrays["caption_embeddings"], arrays.get("image_codes"),
               arrays.get("caption_codes"), manifest["images"]["filename"],
               np.asarray(manifest["images"]["image_id"]), manifest["captions"]["text"],
               np.asarray(manifest["captions"]["image_row"]),
               functools.partial(loaded.setup.split, manifest["split"]) if same_dataset else None)

  def codes(self, kind):
    codes = self.image_codes if kind == "image" else self.caption_codes
    if codes is None:
      raise ValueError("codes='hamming': the gallery has no hash codes (a model with image_codes/text_codes "
                       "methods, such as CCLS2T, exports them)")
    return codes


def run(config, workdir, *, queries=(), image_paths=(), sample_queries=0, k=5, checkpoint="", gallery_dir="",
        split="", codes="float", targets="captions", png="", output=""):
  """--mode=search: loads the model and gallery, runs every query, prints the results (markdown), optionally
  writes them as JSON (`output`) and the picture of the ranked images (`png`). Returns the results."""
  loaded = trained_lib.load(config, workdir, checkpoint)
  with jax.set_mesh(loaded.setup.mesh):
    gallery = load_gallery(loaded, gallery_dir=gallery_dir, split=split, codes=codes)
    queries = list(queries) + (sample_gallery_queries(gallery, sample_queries) if sample_queries else [])
    if not queries and not image_paths:
      raise ValueError("--mode=search needs --query, --image or --sample_queries")
    results = text_to_images(loaded, gallery, queries, k, codes=codes) if queries else []
    if image_paths:
      results += image_to_gallery(loaded, gallery, image_paths, k, codes=codes, targets=targets)
  if jax.process_index() == 0:
    print(format_results(results), flush=True)
    if output:
      with open(output, "w") as f:
        json.dump(results, f, indent=2)
    if png:
      picture(gallery, results, png)
  return results


def load_gallery(loaded, *, gallery_dir="", split="", codes="float"):
  if gallery_dir:
    return Gallery.from_export(loaded, gallery_dir)
  return Gallery.from_split(loaded, split or loaded.config.dataset.test_split, codes=codes)


def text_to_images(loaded, gallery, queries, k, *, codes="float"):
  """Per query: {query, results: [{rank, row, image_id, filename, score, ground_truth}], ground_truth: [rows]}."""
  _check_codes(codes)
  setup = loaded.setup
  tokens, lengths = embedding.encode_queries(setup, queries)
  batches = embedding.text_batches(setup, tokens, lengths, embedding.free_text_fields(setup))
  if codes == "hamming":
    query = embedding.embed_all(setup, loaded.variables, "text_codes", batches)
    scores, rows = hamming_topk(query, gallery.codes("image"), k)
  else:
    query = embedding.embed_all(setup, loaded.variables, "texts", batches)
    scores, rows = topk.exact_topk(query, gallery.image_embeddings, k, variables=loaded.variables,
                                   score_fn=topk.ModelScore(setup.model, text_queries=True))
  by_caption = {}
  for caption, row in zip(gallery.captions, gallery.caption_image_row):
    by_caption.setdefault(_normal(caption), set()).add(int(row))
  results = []
  for query, query_scores, query_rows in zip(queries, scores, rows):
    truth = sorted(by_caption.get(_normal(query), ()))
    results.append({"query": query, "ground_truth": truth, "results": [
        {"rank": rank + 1, "row": int(row), "image_id": int(gallery.image_ids[row]),
         "filename": gallery.filenames[row], "score": float(score), "ground_truth": int(row) in truth}
        for rank, (score, row) in enumerate(zip(query_scores, query_rows))]})
  return results


def image_to_gallery(loaded, gallery, paths, k, *, codes="float", targets="captions"):
  """Per image file: its top-k captions (targets='captions') or gallery images (targets='images')."""
  _check_codes(codes)
  if targets not in TARGETS:
    raise ValueError(f"--targets={targets!r}: expected one of {TARGETS}")
  setup = loaded.setup
  batches = [(embedding.read_image_files(setup, paths), {})]
  if codes == "hamming":
    query = embedding.embed_all(setup, loaded.variables, "image_codes", batches)
    scores, rows = hamming_topk(query, gallery.codes("caption" if targets == "captions" else "image"), k)
  elif targets == "captions":
    query = embedding.embed_all(setup, loaded.variables, "images", batches)
    scores, rows = topk.exact_topk(query, gallery.caption_embeddings, k, variables=loaded.variables,
                                   score_fn=topk.ModelScore(setup.model, text_queries=False))
  else:
    query = embedding.embed_all(setup, loaded.variables, "images", batches)
    if not isinstance(query, np.ndarray) or query.ndim != 2:
      raise ValueError(f"--targets=images: model {loaded.config.model_name!r} embeds images as "
                       f"{jax.tree.map(np.shape, query)}, not vectors to compare by cosine; use codes='hamming' or "
                       "targets='captions'")
    scores, rows = topk.exact_topk(query, gallery.image_embeddings, k, score_fn=_cosine)
  image_row = {name: row for row, name in enumerate(gallery.filenames)}
  results = []
  for path, query_scores, query_rows in zip(paths, scores, rows):
    own = image_row.get(os.path.basename(path))
    if targets == "captions":
      truth = [] if own is None else np.flatnonzero(gallery.caption_image_row == own).tolist()
      items = [{"caption": gallery.captions[row], "image_row": int(gallery.caption_image_row[row]),
                "filename": gallery.filenames[gallery.caption_image_row[row]]} for row in query_rows]
    else:
      truth = [] if own is None else [own]
      items = [{"image_id": int(gallery.image_ids[row]), "filename": gallery.filenames[row]} for row in query_rows]
    results.append({"query": path, "ground_truth": truth, "results": [
        {"rank": rank + 1, "row": int(row), **item, "score": float(score), "ground_truth": int(row) in truth}
        for rank, (score, row, item) in enumerate(zip(query_scores, query_rows, items))]})
  return results


def sample_gallery_queries(gallery, count):
  """The first caption of `count` evenly spaced gallery images: queries whose ground truth is known."""
  if count > len(gallery.filenames):
    raise ValueError(f"--sample_queries={count}: the gallery has only {len(gallery.filenames)} images")
  firsts = {}
  for caption, row in zip(gallery.captions, gallery.caption_image_row):
    firsts.setdefault(int(row), caption)
  return [firsts[int(row)] for row in np.linspace(0, len(gallery.filenames) - 1, count).round()]


def picture(gallery, results, png_path):
  """Writes the gallery picture (PNG) of text-query results: each query and its images, ground truth outlined."""
  rows = []
  for result in results:
    items = result["results"]
    if any("caption" in item for item in items):
      raise ValueError("--png draws ranked images; these results are captions (use --targets=images)")
    note = ("no gallery caption equals this query: no ground truth" if not result["ground_truth"] else
            "" if any(r["ground_truth"] for r in items) else f"ground truth not in the top {len(items)}")
    rows.append(gallery_lib.Row(result["query"], [gallery.data.image(r["row"]) for r in items],
                                [r["score"] for r in items], [r["ground_truth"] for r in items], note))
  image = gallery_lib.render(rows)
  image.save(png_path)
  return image


def format_results(results):
  """Markdown: one table per query."""
  blocks = []
  for result in results:
    first = result["results"][0] if result["results"] else {}
    named = "caption" if "caption" in first else "filename"
    lines = [f"**{result['query']}**", "", f"| rank | score | {named} | ground truth |", "|---:|---:|---|:---:|"]
    lines += [f"| {r['rank']} | {r['score']:.4f} | {r[named]} | {'yes' if r['ground_truth'] else ''} |"
              for r in result["results"]]
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def _check_codes(codes):
  if codes not in CODES:
    raise ValueError(f"--codes={codes!r}: expected one of {CODES}")


def _normal(text):
  return " ".join(text.lower().split())


def hamming_topk(query_codes, gallery_words, k):
  """(Hamming distances, gallery rows), both (Q, k), of the k nearest packed gallery codes to the signs of the
  (Q, K) relaxed `query_codes`, nearest first, ties by lower row: `exact_topk` of -distance."""
  query_words = hash_index.pack_codes(query_codes)
  if query_words.shape[1] != gallery_words.shape[1]:
    raise ValueError(f"query codes have {query_words.shape[1]} words, the gallery's {gallery_words.shape[1]}")
  scores, rows = topk.exact_topk(query_words, gallery_words, k, score_fn=_negative_hamming)
  return (-scores).astype(np.int32), rows


def _negative_hamming(variables, query_words, gallery_words):
  del variables
  return -hash_index.hamming_distances(query_words, gallery_words).astype(jnp.float32)


def _cosine(variables, queries, gallery):
  del variables
  return topk.dot_scores(None, _unit(queries), _unit(gallery))


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
