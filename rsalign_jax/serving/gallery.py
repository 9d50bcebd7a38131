"""Gallery pictures: for a few text queries, the query and its top-k images, ground truth outlined in green.

`render` draws rows of (query text, ranked thumbnails with scores) with PIL. `split_picture` ranks a split's images
for some of its own captions (so the ground truth is known) and renders them; the `gallery` evaluator
(`rsalign_jax.evaluation.evaluators.gallery`, default entry `config.evals.val_gallery`) writes that picture to
TensorBoard during training.
"""
import dataclasses
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsalign_jax.serving import embedding
from rsalign_jax.evaluation import topk

TRUTH_COLOUR = (0, 190, 0)
OTHER_COLOUR = (170, 170, 170)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


@dataclasses.dataclass
class Row:
  """One query of a picture: its text, its ranked images, their scores and which are ground truth."""
  query: str
  images: list  # PIL images, best first
  scores: list
  ground_truth: list  # bools
  note: str = ""  # e.g. where the ground truth ranks when it is not shown


def render(rows, *, thumb=96, text_width=280, border=4, margin=8, font_size=13):
  """The picture of `rows` as an RGB PIL image."""
  if not rows:
    raise ValueError("gallery: no rows to draw")
  font = ImageFont.load_default(size=font_size)
  line = font_size + 4
  columns = max(len(r.images) for r in rows)
  cell = thumb + 2 * border
  row_height = max(cell + line, _text_height(rows, font, text_width, line))
  width = margin + text_width + columns * (cell + margin)
  picture = Image.new("RGB", (width, margin + len(rows) * (row_height + margin)), BACKGROUND)
  draw = ImageDraw.Draw(picture)
  for r, row in enumerate(rows):
    top = margin + r * (row_height + margin)
    for i, text in enumerate(_wrap(row, font, text_width)):
      draw.text((margin, top + i * line), text, fill=TEXT_COLOUR, font=font)
    for c, (image, score, truth) in enumerate(zip(row.images, row.scores, row.ground_truth)):
      left = margin + text_width + c * (cell + margin)
      colour, thickness = (TRUTH_COLOUR, border) if truth else (OTHER_COLOUR, 1)
      draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
      draw.rectangle([left + thickness, top + thickness, left + cell - 1 - thickness, top + cell - 1 - thickness],
                     fill=BACKGROUND)
      picture.paste(image.convert("RGB").resize((thumb, thumb), Image.BILINEAR), (left + border, top + border))
      draw.text((left, top + cell + 1), f"{c + 1}. {score:.3f}", fill=TEXT_COLOUR, font=font)
  return picture


def _wrap(row, font, width):
  chars = max(8, int(width / max(font.getlength("x"), 1)) - 2)
  lines = textwrap.wrap(f'"{row.query}"', chars)
  return lines + (textwrap.wrap(row.note, chars) if row.note else [])


def _text_height(rows, font, width, line):
  return max(len(_wrap(row, font, width)) for row in rows) * line


def split_picture(setup, variables, data, *, num_queries=4, k=5):
  """Ranks `data`'s images for the first captions of `num_queries` evenly spaced images and renders them, each
  caption's own image as the ground truth (as the metrics count it). Returns (PIL image, rows)."""
  num_images = data.index.num_images
  positions = np.unique(np.linspace(0, num_images - 1, min(num_queries, num_images)).round().astype(int))
  caption_rows = np.searchsorted(data.index.record, positions)  # each image's first caption
  image_embeddings = embedding.embed_all(setup, variables, "images", embedding.image_batches(setup, data))
  fields = {name: value[caption_rows] for name, value in data.text_fields.items()}
  queries = embedding.embed_all(setup, variables, "texts", embedding.text_batches(
      setup, data.tokens[caption_rows], data.lengths[caption_rows], fields))
  ranked = topk.exact_topk(queries, image_embeddings, num_images, variables=variables,
                           score_fn=topk.ModelScore(setup.model, text_queries=True))
  rows = [_row(data, int(caption_rows[q]), int(positions[q]), scores, indices, k)
          for q, (scores, indices) in enumerate(zip(*ranked))]
  return render(rows), rows


def _row(data, caption_row, truth, scores, indices, k):
  rank = int(np.flatnonzero(indices == truth)[0]) + 1
  note = f"ground truth: {data.index.filenames[truth]}, rank {rank}"
  return Row(data.index.captions[caption_row], [data.image(int(i)) for i in indices[:k]], scores[:k].tolist(),
             [int(i) == truth for i in indices[:k]], note)

