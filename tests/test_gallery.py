"""The gallery picture (`serving.gallery.render`): layout, ground-truth outlines, text, PNG round trip."""
import numpy as np
import PIL.Image
import pytest

from rsalign_jax.serving import gallery

THUMB, BORDER, MARGIN, TEXT = 40, 4, 8, 200
CELL = THUMB + 2 * BORDER


def solid(colour):
  return PIL.Image.new("RGB", (64, 64), colour)


def cell_box(row, column, row_height):
  left = MARGIN + TEXT + column * (CELL + MARGIN)
  top = MARGIN + row * (row_height + MARGIN)
  return left, top


def test_picture_layout_outlines_and_png(tmp_path):
  rows = [gallery.Row("two planes near a runway", [solid((200, 0, 0)), solid((0, 0, 200))], [0.9, 0.5],
                      [False, True]),
          gallery.Row("a pond", [solid((0, 0, 200)), solid((200, 0, 0))], [0.7, 0.6], [False, False],
                      note="ground truth not in the top 2")]
  picture = gallery.render(rows, thumb=THUMB, text_width=TEXT, border=BORDER, margin=MARGIN)
  row_height = CELL + 17  # thumbnail cell and its score line are taller than 3 lines of query text
  assert picture.size == (MARGIN + TEXT + 2 * (CELL + MARGIN), MARGIN + 2 * (row_height + MARGIN))
  pixels = np.asarray(picture)
  green = np.all(pixels == gallery.TRUTH_COLOUR, axis=-1)
  left, top = cell_box(0, 1, row_height)  # the only ground truth
  frame = np.zeros_like(green)
  frame[top:top + CELL, left:left + CELL] = True
  frame[top + BORDER:top + CELL - BORDER, left + BORDER:left + CELL - BORDER] = False
  np.testing.assert_array_equal(green, frame)
  left, top = cell_box(1, 0, row_height)
  np.testing.assert_array_equal(pixels[top + BORDER + THUMB // 2, left + BORDER + THUMB // 2], (0, 0, 200))
  np.testing.assert_array_equal(pixels[top, left], gallery.OTHER_COLOUR)  # 1 px grey frame for the others
  text = pixels[MARGIN:MARGIN + 17, MARGIN:MARGIN + TEXT]
  assert (text.sum(-1) < 200).sum() > 50  # the query is written in dark ink
  picture.save(tmp_path / "gallery.png")
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "gallery.png")), pixels)


def test_long_queries_make_taller_rows_and_empty_pictures_are_errors():
  short = gallery.render([gallery.Row("a pond", [solid((0, 0, 0))], [0.1], [True])])
  tall = gallery.render([gallery.Row("a very long query " * 30, [solid((0, 0, 0))], [0.1], [True])])
  assert tall.width == short.width and tall.height > short.height
  with pytest.raises(ValueError, match="no rows to draw"):
    gallery.render([])
