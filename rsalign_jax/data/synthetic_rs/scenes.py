"""Procedural top-down "aerial" scenes and their acquisition metadata (numpy + PIL only).

Every example is a pure function of `(seed, split, index)`: independent random
streams are derived with `np.random.default_rng([seed, split_code, index, stream])`,
so any example can be regenerated alone, on any machine, in any order. The layout
(what is where) never depends on the output resolution; only pixel noise does.

A scene painter draws in normalised coordinates (0..1, y pointing down) on a
supersampled canvas and returns the `ObjectGroup`s it drew: kind, count, colour,
size, position and relation of every caption-worthy set of objects. The canvas is
then box-downsampled (antialiasing), radiometrically jittered, and finally
rotated/flipped by a random dihedral transform that is applied to the layout too.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from rsalign_jax.data.synthetic_rs import captions as captions_lib

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Independent random streams of one example; see `_rng`.
_SCENE_STREAM, _ACQUISITION_STREAM, _LAYOUT_STREAM, _PIXEL_STREAM, _CAPTION_STREAM = range(5)

# Named object colours as seen from above (slightly desaturated, like real imagery).
PALETTE = {
    "white": (226, 226, 220),
    "grey": (128, 130, 132),
    "black": (46, 47, 50),
    "red": (168, 52, 44),
    "blue": (52, 86, 158),
    "yellow": (212, 180, 64),
    "green": (64, 124, 64),
    "orange": (206, 118, 50),
    "brown": (122, 86, 60),
}
WATER = {"blue": (34, 64, 100), "green": (44, 94, 86), "brown": (104, 90, 64)}
SHALLOW_WATER = (58, 130, 138)
ASPHALT = (76, 78, 80)
CONCRETE = (168, 166, 158)
PAVING = (184, 176, 160)
SAND = (206, 188, 146)
SOIL = (136, 108, 80)
DIRT_ROAD = (170, 146, 112)
PAINT = (236, 236, 230)
LUSH_GRASS, DRY_GRASS = (70, 114, 52), (160, 148, 98)
LUSH_CANOPY, DRY_CANOPY = (34, 74, 36), (142, 104, 50)
_SHADOW = (0, 0, 0, 96)
_HAZE = np.array([188, 192, 200], np.float32)

# Canonical object outlines, unit length, pointing along +x.
_PLANE_HALF = [(0.5, 0.0), (0.43, 0.04), (0.1, 0.05), (-0.13, 0.47), (-0.21, 0.47), (-0.11, 0.05),
               (-0.36, 0.04), (-0.44, 0.18), (-0.5, 0.18), (-0.47, 0.0)]
PLANE = _PLANE_HALF + [(x, -y) for x, y in reversed(_PLANE_HALF[1:-1])]
SHIP = [(0.5, 0.0), (0.3, 0.11), (-0.5, 0.1), (-0.5, -0.1), (0.3, -0.11)]
RECT = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
CROSS = [(-0.5, -0.1), (0.1, -0.1), (0.1, -0.3), (0.26, -0.3), (0.26, -0.1), (0.5, -0.1),
         (0.5, 0.1), (0.26, 0.1), (0.26, 0.3), (0.1, 0.3), (0.1, 0.1), (-0.5, 0.1)]


@dataclasses.dataclass(frozen=True)
class ObjectGroup:
  """A set of alike objects that one caption noun phrase can describe truthfully.

  Attributes:
    kind: noun key into `captions.NOUNS`, e.g. "plane".
    count: number of objects, or None for mass nouns ("sand", "grass").
    colour: colour name shared by all objects (a key of `captions.COLOUR_WORDS`).
    size: "small" or "large", if the objects have a characteristic size.
    centre: normalised (x, y) centroid, y down; None if spread over the image.
    relation: (relation, landmark), e.g. ("next_to", "runway").
    orientation: "horizontal" or "vertical" for linear features (roads, rivers).
  """

  kind: str
  count: int | None = 1
  colour: str | None = None
  size: str | None = None
  centre: tuple[float, float] | None = None
  relation: tuple[str, str] | None = None
  orientation: str | None = None

  @property
  def region(self) -> str | None:
    """Position on a 3x3 grid: "top left", "top", ..., "center"; None if spread out."""
    if self.centre is None:
      return None
    x, y = self.centre
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return f"{vertical} {horizontal}".strip() or "center"


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a generated image shows; the ground truth that captions are made from."""

  scene: str
  groups: tuple[ObjectGroup, ...]


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """Simulated acquisition metadata; zoom and greenness also change the pixels."""

  sensor: str
  gsd: float
  date: str
  lat: float
  lon: float

  @property
  def zoom(self) -> float:
    """Object scale factor: finer ground sample distance shows larger objects."""
    return float(np.clip((0.5 / self.gsd) ** 0.25, 0.55, 1.12))

  @property
  def greenness(self) -> float:
    """0 (dormant, straw-coloured) .. 1 (lush) vegetation from season and latitude."""
    month = int(self.date[5:7])
    peak = 7 if self.lat >= 0 else 1
    seasonality = min(1.0, abs(self.lat) / 45.0)
    return min(1.0, 0.72 + 0.35 * seasonality * math.cos(2 * math.pi * (month - peak) / 12))


# --------------------------------------------------------------------------- canvas


class Canvas:
  """A supersampled RGB canvas addressed in normalised coordinates."""

  def __init__(self, size: int, rng: np.random.Generator):
    self.size = size
    self.image = Image.new("RGB", (size, size))
    self._draw = ImageDraw.Draw(self.image, "RGBA")
    self._rng = rng
    self._y, self._x = np.mgrid[0:size, 0:size].astype(np.float32) / size

  def _xy(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * self.size, y * self.size) for x, y in points]

  def _smooth_noise(self, cells: int) -> np.ndarray:
    """Band-limited noise, roughly N(0, 1) with `cells` blobs across the canvas."""
    grid = self._rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    box = (1, 1, cells + 2, cells + 2)
    return np.asarray(Image.fromarray(grid).resize((self.size, self.size), Image.BICUBIC, box=box))

  def texture(self, colour, *, mottle=0.1, grain=5.0, cells=5, stripes=None) -> Image.Image:
    """A full-canvas texture: base colour x low-frequency mottle (+ stripes) + grain.

    Args:
      colour: base RGB.
      mottle: relative amplitude of two-octave smooth noise.
      grain: std of per-pixel noise in grey levels.
      cells: number of mottle blobs across the canvas.
      stripes: optional (period, angle, depth, warp) of a sinusoidal pattern, e.g.
        crop rows or dunes; `warp` bends the stripes by smooth noise.
    """
    shade = 1.0 + mottle * (0.7 * self._smooth_noise(cells) + 0.3 * self._smooth_noise(4 * cells))
    if stripes is not None:
      period, angle, depth, warp = stripes
      phase = (self._x * math.cos(angle) + self._y * math.sin(angle)) / period
      phase = phase + warp * self._smooth_noise(3)
      shade = shade * (1.0 + depth * np.sin(2 * math.pi * phase))
    rgb = np.asarray(colour, np.float32) * shade[..., None]
    rgb = rgb + grain * self._rng.standard_normal((self.size, self.size, 1), dtype=np.float32)
    return Image.fromarray(_to_uint8(rgb))

  def fill(self, texture: Image.Image) -> None:
    self.image.paste(texture)

  def fill_polygon(self, points, texture: Image.Image) -> None:
    mask = Image.new("L", self.image.size)
    ImageDraw.Draw(mask).polygon(self._xy(points), fill=255)
    self.image.paste(texture, mask=mask)

  def polygon(self, points, colour, alpha: int = 255) -> None:
    self._draw.polygon(self._xy(points), fill=_rgba(colour, alpha))

  def rect(self, box, colour, alpha: int = 255) -> None:
    self.polygon(_box(*box), colour, alpha)

  def ellipse(self, centre, radius, colour, alpha: int = 255, outline=None, width: float = 0.0) -> None:
    rx, ry = (radius, radius) if np.isscalar(radius) else radius
    (x0, y0), (x1, y1) = self._xy([(centre[0] - rx, centre[1] - ry), (centre[0] + rx, centre[1] + ry)])
    line = None if outline is None else _rgba(outline)
    fill = None if colour is None else _rgba(colour, alpha)
    self._draw.ellipse((x0, y0, x1, y1), fill=fill, outline=line, width=self._width(width))

  def line(self, points, colour, width: float, alpha: int = 255) -> None:
    self._draw.line(self._xy(points), fill=_rgba(colour, alpha), width=self._width(width), joint="curve")

  def pieslice(self, centre, radius, start_deg, end_deg, colour) -> None:
    (x0, y0), (x1, y1) = self._xy([(centre[0] - radius, centre[1] - radius),
                                   (centre[0] + radius, centre[1] + radius)])
    self._draw.pieslice((x0, y0, x1, y1), start_deg, end_deg, fill=_rgba(colour))

  def stadium(self, centre, half_length: float, half_width: float, fill=None, outline=None) -> None:
    """A horizontal rectangle with semicircular ends, e.g. a running track."""
    (x0, y0), (x1, y1) = self._xy([(centre[0] - half_length, centre[1] - half_width),
                                   (centre[0] + half_length, centre[1] + half_width)])
    self._draw.rounded_rectangle((x0, y0, x1, y1), (y1 - y0) / 2, fill=None if fill is None else _rgba(fill),
                                 outline=None if outline is None else _rgba(outline, 200))

  def shadow(self, points, offset: float) -> None:
    self._draw.polygon(self._xy(_shift(points, offset)), fill=_SHADOW)

  def shape(self, template, centre, scale, angle, colour, shadow: float = 0.0) -> list:
    """Draws a rotated, scaled outline with an optional cast shadow; returns its corners."""
    points = _place(template, centre, scale, angle)
    if shadow:
      self.shadow(points, shadow)
    self.polygon(points, colour)
    return points

  def _width(self, width: float) -> int:
    return max(1, round(width * self.size)) if width else 0


def _rgba(colour, alpha: int = 255) -> tuple[int, int, int, int]:
  return (*(int(round(v)) for v in colour), alpha)


def _to_uint8(array: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _box(x0, y0, x1, y1):
  return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _place(template, centre, scale, angle):
  """Scales (scalar or (length, width)), rotates and moves a unit outline."""
  sx, sy = (scale, scale) if np.isscalar(scale) else scale
  cos, sin = math.cos(angle), math.sin(angle)
  return [(centre[0] + x * sx * cos - y * sy * sin, centre[1] + x * sx * sin + y * sy * cos)
          for x, y in template]


def _shift(points, offset: float):
  """Moves points towards the bottom right, where every shadow of a scene falls."""
  return [(x + 0.8 * offset, y + 0.6 * offset) for x, y in points]


def _mix(a, b, t: float):
  return tuple(float(u + (v - u) * t) for u, v in zip(a, b))


def _jitter(colour, rng: np.random.Generator, amount: float = 10.0):
  return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in colour)


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _mean_centre(points) -> tuple[float, float]:
  xs, ys = zip(*points)
  return (float(np.mean(xs)), float(np.mean(ys)))


def _by_colour(kind: str, colours: Sequence[str], centres, **attributes) -> list[ObjectGroup]:
  """One group per colour, so that every colour word in a caption has an exact count."""
  groups = []
  for colour in sorted(set(colours)):
    members = [c for c, name in zip(centres, colours) if name == colour]
    groups.append(ObjectGroup(kind, len(members), colour, centre=_mean_centre(members), **attributes))
  return groups


def _grid_centres(count: int, box, rows: int):
  """Centres of `count` cells filled row by row in a `rows` x ceil(count/rows) grid."""
  x0, y0, x1, y1 = box
  cols = -(-count // rows)
  return [(x0 + (x1 - x0) * (j % cols + 0.5) / cols, y0 + (y1 - y0) * (j // cols + 0.5) / rows)
          for j in range(count)]


# --------------------------------------------------------------------------- objects


def _vegetation(acq: Acquisition):
  return _mix(DRY_GRASS, LUSH_GRASS, acq.greenness)


def _vegetation_word(acq: Acquisition) -> str:
  return "green" if acq.greenness >= 0.5 else "yellow"


def _canopy_word(acq: Acquisition) -> str:
  return "green" if acq.greenness >= 0.5 else "brown"


def _canopy(acq: Acquisition):
  return _mix(DRY_CANOPY, LUSH_CANOPY, acq.greenness)


def _tree(c: Canvas, centre, radius: float, colour) -> None:
  c.ellipse((centre[0] + 0.5 * radius, centre[1] + 0.4 * radius), radius, (0, 0, 0), alpha=80)
  c.ellipse(centre, radius, colour)
  c.ellipse((centre[0] - 0.3 * radius, centre[1] - 0.3 * radius), 0.45 * radius,
            _mix(colour, (255, 255, 255), 0.15), alpha=150)


def _trees(c: Canvas, rng, acq, centres, radius: float) -> None:
  """Tree crowns of jittered size and seasonal colour (random draws batched for speed)."""
  radii = radius * rng.uniform(0.7, 1.3, len(centres))
  colours = np.clip(np.asarray(_canopy(acq)) + rng.uniform(-14, 14, (len(centres), 3)), 0, 255)
  for centre, crown, colour in zip(centres, radii, colours):
    _tree(c, centre, crown, colour)


def _house(c: Canvas, rng, centre, length: float, width: float, angle: float, roof) -> None:
  """A gable-roofed house: its cast shadow, then a lit and a shaded roof half."""
  roof = _jitter(roof, rng, 12)
  shadow = 0.25 * min(length, width)
  c.shadow(_place(RECT, centre, (length, width), angle), shadow)
  half = 0.25 * width
  dx, dy = -math.sin(angle) * half, math.cos(angle) * half
  c.shape(RECT, (centre[0] - dx, centre[1] - dy), (length, width / 2), angle, roof)
  c.shape(RECT, (centre[0] + dx, centre[1] + dy), (length, width / 2), angle, _mix(roof, (0, 0, 0), 0.25))


def _car(c: Canvas, centre, length: float, angle: float, colour) -> None:
  c.shape(RECT, centre, (length, 0.48 * length), angle, colour, shadow=0.12 * length)
  cos, sin = math.cos(angle), math.sin(angle)
  roof = (centre[0] - 0.05 * length * cos, centre[1] - 0.05 * length * sin)
  c.shape(RECT, roof, (0.45 * length, 0.36 * length), angle, _mix(colour, (20, 24, 30), 0.45))


def _ship(c: Canvas, rng, centre, length: float, angle: float, colour) -> None:
  hull = _jitter(colour, rng, 8)
  c.shape(SHIP, centre, length, angle, hull, shadow=0.05 * length)
  cabin_colour = PALETTE["white"] if colour != PALETTE["white"] else PALETTE["grey"]
  cos, sin = math.cos(angle), math.sin(angle)
  cabin = (centre[0] - 0.25 * length * cos, centre[1] - 0.25 * length * sin)
  c.shape(RECT, cabin, (0.22 * length, 0.13 * length), angle, cabin_colour)


def _tank(c: Canvas, centre, radius: float, colour) -> None:
  c.ellipse((centre[0] + 0.25 * radius, centre[1] + 0.2 * radius), radius, (0, 0, 0), alpha=110)
  c.ellipse(centre, radius, colour, outline=_mix(colour, (0, 0, 0), 0.35), width=0.08 * radius)
  c.ellipse(centre, 0.65 * radius, None, outline=_mix(colour, (0, 0, 0), 0.2), width=0.04 * radius)
  c.ellipse(centre, 0.1 * radius, _mix(colour, (0, 0, 0), 0.3))


def _pack_houses(c: Canvas, rng, box, zoom: float, roof_for: Callable[[], tuple]) -> int:
  """Fills a block with two back-to-back rows of detached houses; returns the count."""
  x0, y0, x1, y1 = box
  depth = (y1 - y0) / 2
  count = 0
  for row in range(2):
    x = x0 + rng.uniform(0.0, 0.01)
    while True:
      width = rng.uniform(0.05, 0.08) * zoom
      if x + width > x1:
        break
      house_depth = depth * rng.uniform(0.65, 0.92)
      y = y0 + house_depth / 2 + 0.004 if row == 0 else y1 - house_depth / 2 - 0.004
      _house(c, rng, (x + width / 2, y), width * rng.uniform(0.75, 0.9), house_depth, 0.0, roof_for())
      x += width
      count += 1
  return count


def _wavy_line(rng, y0: float, amplitude: float, samples: int = 24):
  """Points of a smooth random curve crossing the canvas from left to right."""
  xs = np.linspace(-0.05, 1.05, samples)
  freq, phase = rng.uniform(0.6, 1.6), rng.uniform(0, 2 * math.pi)
  ys = y0 + amplitude * np.sin(2 * math.pi * freq * xs + phase)
  ys = ys + 0.3 * amplitude * np.sin(2 * math.pi * 2.7 * freq * xs + 2 * phase)
  return list(zip(xs.tolist(), ys.tolist()))


def _band(curve, half_width: float):
  """Polygon of a band of `half_width` around a left-to-right curve."""
  return [(x, y - half_width) for x, y in curve] + [(x, y + half_width) for x, y in reversed(curve)]


def _blob(rng, centre, radius: float, aspect: float, points: int = 28):
  """An irregular closed outline (ponds, clearings)."""
  angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
  wobble = 1 + 0.12 * np.sin(2 * angles + rng.uniform(0, 6)) + 0.08 * np.sin(3 * angles + rng.uniform(0, 6))
  return [(centre[0] + radius * w * math.cos(a), centre[1] + radius * w * aspect * math.sin(a))
          for a, w in zip(angles, wobble)]


# --------------------------------------------------------------------------- scenes
# Each painter draws one scene class in a canonical orientation and returns its groups.


def _paint_airport(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_mix(DRY_GRASS, _vegetation(acq), 0.5), mottle=0.12, cells=4))
  runway_y = rng.uniform(0.18, 0.32)
  c.fill_polygon(_box(-0.05, runway_y - 0.045, 1.05, runway_y + 0.045), c.texture(ASPHALT, mottle=0.06, grain=4))
  for x in np.arange(rng.uniform(0, 0.09), 1.0, 0.09):
    c.rect((x, runway_y - 0.003, x + 0.045, runway_y + 0.003), PAINT)
  taxi_y = runway_y + rng.uniform(0.09, 0.12)
  c.line([(-0.05, taxi_y), (1.05, taxi_y)], (104, 106, 106), 0.022)
  for x in rng.uniform(0.1, 0.9, size=2):
    c.line([(x, runway_y), (x, taxi_y)], (104, 106, 106), 0.02)
  apron = (rng.uniform(0.02, 0.2), taxi_y + 0.035, rng.uniform(0.8, 0.98), rng.uniform(0.84, 0.9))
  c.fill_polygon(_box(*apron), c.texture(CONCRETE, mottle=0.05, grain=4))
  c.rect((apron[0] + 0.03, apron[3], apron[2] - 0.03, 1.0), (196, 198, 200))

  count = int(rng.integers(1, 7))
  colour = _pick(rng, ("white", "white", "white", "grey", "blue", "red"))
  rows = 1 if count <= 3 else 2
  cols = -(-count // rows)
  length = min(_pick(rng, (0.12, 0.19)) * acq.zoom, (apron[2] - apron[0]) / cols / 1.1,
               (apron[3] - apron[1]) / rows / 1.1)
  centres = _grid_centres(count, apron, rows)
  for centre in centres:
    c.shape(PLANE, centre, length, -math.pi / 2 + rng.uniform(-0.1, 0.1), _jitter(PALETTE[colour], rng, 6),
            shadow=0.06 * length)
  return [
      ObjectGroup("plane", count, colour, "large" if length >= 0.12 else "small", _mean_centre(centres),
                  relation=("next_to", "runway")),
      ObjectGroup("runway", 1, centre=(0.5, runway_y), orientation="horizontal"),
  ]


def _paint_harbour(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(CONCRETE, mottle=0.08, grain=5))
  coast = rng.uniform(0.34, 0.46)
  water = _pick(rng, ("blue", "green"))
  c.fill_polygon(_box(-0.01, coast, 1.01, 1.01), c.texture(WATER[water], mottle=0.08, grain=3, cells=3))
  c.line([(0, coast), (1, coast)], (92, 92, 88), 0.01)
  for _ in range(int(rng.integers(2, 5))):
    x, y = rng.uniform(0.05, 0.8), rng.uniform(0.03, coast - 0.14)
    roof = _jitter(_pick(rng, (PALETTE["grey"], PALETTE["blue"], PALETTE["white"], (150, 90, 70))), rng)
    c.shape(RECT, (x + 0.08, y + 0.05), (0.16, 0.1), 0.0, roof, shadow=0.015)

  count = int(rng.integers(1, 7))
  piers = max(int(rng.integers(2, 5)), -(-count // 2))
  pier_xs = (np.arange(piers) + 0.5) / piers + rng.uniform(-0.03, 0.03, piers)
  pier_length = rng.uniform(0.3, 0.45)
  for x in pier_xs:
    c.shape(RECT, (x, coast + pier_length / 2), (0.032, pier_length), 0.0, (172, 170, 164), shadow=0.006)
  colour = _pick(rng, ("white", "white", "red", "blue", "grey", "black"))
  length = min(_pick(rng, (0.15, 0.25)) * acq.zoom, pier_length)
  width = 0.22 * length
  slots = [(x + side * (0.016 + 0.6 * width), coast + 0.01 + length / 2 + rng.uniform(0, pier_length - length))
           for x in pier_xs for side in (-1, 1)]
  centres = [slots[i] for i in rng.permutation(len(slots))[:count]]
  for centre in centres:
    _ship(c, rng, centre, length, _pick(rng, (math.pi / 2, -math.pi / 2)), PALETTE[colour])
  return [
      ObjectGroup("ship", count, colour, "large" if length >= 0.18 else "small", _mean_centre(centres),
                  relation=("next_to", "pier")),
      ObjectGroup("sea", 1, water, centre=(0.5, (coast + 1) / 2)),
  ]


def _paint_beach(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(SAND, mottle=0.06, grain=7, cells=6))
  shore = _wavy_line(rng, rng.uniform(0.32, 0.45), 0.03)
  water = _pick(rng, ("blue", "green"))
  c.polygon(_band(shore, 0.035)[len(shore):] + shore, (150, 128, 92), alpha=90)
  sea = [(-0.05, -0.05), (1.05, -0.05)] + shore[::-1]
  c.fill_polygon(sea, c.texture(WATER[water], mottle=0.1, grain=3, cells=3))
  c.polygon([(x, y - 0.09) for x, y in shore] + shore[::-1], SHALLOW_WATER, alpha=110)
  for offset in (0.012, 0.035, 0.06):
    c.line([(x, y - offset) for x, y in shore], PAINT, 0.008, alpha=170)

  groups = [ObjectGroup("sea", 1, water, centre=(0.5, float(np.mean([y for _, y in shore])) / 2))]
  if rng.random() < 0.4:
    c.fill_polygon(_box(-0.01, 0.86, 1.01, 1.01), c.texture(_vegetation(acq), mottle=0.15))
  count = int(rng.integers(0, 7))
  if count:
    colour = _pick(rng, ("red", "blue", "yellow", "white", "orange"))
    xs = np.sort(rng.uniform(0.06, 0.94, count))
    centres = [(x, np.interp(x, *zip(*shore)) + rng.uniform(0.09, 0.2)) for x in xs]
    for centre in centres:
      c.ellipse((centre[0] + 0.015, centre[1] + 0.011), 0.034 * acq.zoom, (0, 0, 0), alpha=80)
      c.ellipse(centre, 0.034 * acq.zoom, _jitter(PALETTE[colour], rng, 8))
    groups.append(ObjectGroup("umbrella", count, colour, centre=_mean_centre(centres), relation=("along", "coast")))
  return groups


def _paint_river(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_vegetation(acq), mottle=0.15, cells=4))
  for _ in range(int(rng.integers(2, 5))):
    x, y = rng.uniform(-0.1, 0.8), _pick(rng, (rng.uniform(-0.1, 0.15), rng.uniform(0.7, 0.9)))
    field = _jitter(_mix(_vegetation(acq), SOIL, rng.uniform(0.2, 0.6)), rng)
    c.rect((x, y, x + rng.uniform(0.2, 0.35), y + rng.uniform(0.15, 0.25)), field, alpha=150)
  curve = _wavy_line(rng, rng.uniform(0.42, 0.58), rng.uniform(0.04, 0.1))
  half_width = rng.uniform(0.05, 0.09) * acq.zoom
  colour = _pick(rng, ("blue", "green", "brown"))
  c.polygon(_band(curve, half_width + 0.015), _mix(SAND, SOIL, 0.3))
  c.fill_polygon(_band(curve, half_width), c.texture(WATER[colour], mottle=0.08, grain=3, cells=3))

  trees = int(rng.integers(10, 30))
  xs, sides = rng.uniform(0, 1, trees), rng.choice((-1, 1), trees)
  curve_xs, curve_ys = zip(*curve)
  centres = [(x, np.interp(x, curve_xs, curve_ys) + s * (half_width + rng.uniform(0.03, 0.07)))
             for x, s in zip(xs, sides)]
  _trees(c, rng, acq, centres, 0.022 * acq.zoom)
  groups = [
      ObjectGroup("river", 1, colour, centre=(0.5, float(np.mean(curve_ys))), orientation="horizontal"),
      ObjectGroup("tree", trees, _canopy_word(acq), relation=("along", "river")),
  ]
  boats = int(rng.integers(0, 3))
  if boats:
    boat_centres = []
    for x in rng.uniform(0.1, 0.9, boats):
      boat_centres.append((x, np.interp(x, curve_xs, curve_ys)))
      _ship(c, rng, boat_centres[-1], 0.07 * acq.zoom, 0.0, PALETTE["white"])
    groups.append(ObjectGroup("ship", boats, "white", "small", _mean_centre(boat_centres), relation=("on", "river")))
  return groups


def _paint_bridge(c: Canvas, rng, acq) -> list[ObjectGroup]:
  urban = rng.random() < 0.5
  c.fill(c.texture(CONCRETE if urban else _vegetation(acq), mottle=0.12, cells=4))
  centre_y, half = rng.uniform(0.42, 0.58), rng.uniform(0.12, 0.19)
  water = _pick(rng, ("blue", "green", "brown"))
  curve = _wavy_line(rng, centre_y, 0.015)
  c.polygon(_band(curve, half + 0.02), _mix(SAND, SOIL, 0.4))
  c.fill_polygon(_band(curve, half), c.texture(WATER[water], mottle=0.08, grain=3, cells=3))

  count = int(rng.integers(1, 3))
  colour = _pick(rng, ("grey", "grey", "white", "red"))
  xs = (np.arange(count) + rng.uniform(0.3, 0.7, count)) / count
  deck = rng.uniform(0.05, 0.08) * acq.zoom
  car_colours, car_centres = [], []
  for x in xs:
    c.line([(x, -0.05), (x, 1.05)], ASPHALT, deck * 0.9)
    c.rect((x - deck / 2 + 0.02, centre_y - half, x + deck / 2 + 0.02, centre_y + half), (0, 0, 0), alpha=90)
    c.rect((x - deck / 2, centre_y - half - 0.03, x + deck / 2, centre_y + half + 0.03),
           _jitter(PALETTE[colour], rng, 6))
    c.line([(x, centre_y - half - 0.03), (x, centre_y + half + 0.03)], _mix(PALETTE[colour], (0, 0, 0), 0.3), 0.004)
    for _ in range(int(rng.integers(0, 3))):
      car_colours.append(_pick(rng, ("white", "black", "red", "blue")))
      car_centres.append((x + _pick(rng, (-1, 1)) * deck / 4, centre_y + rng.uniform(-half, half)))
      _car(c, car_centres[-1], 0.065 * acq.zoom, math.pi / 2, PALETTE[car_colours[-1]])
  return [
      ObjectGroup("bridge", count, colour, centre=(float(np.mean(xs)), centre_y), relation=("across", "river"),
                  orientation="vertical"),
      ObjectGroup("river", 1, water, centre=(0.5, centre_y), orientation="horizontal"),
      *_by_colour("car", car_colours, car_centres, relation=("on", "bridge")),
  ]


def _paint_pond(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_vegetation(acq), mottle=0.16, cells=4))
  count = int(rng.integers(1, 4))
  large = count == 1 or (count == 2 and rng.random() < 0.5)
  radius = (rng.uniform(0.17, 0.24) if large else rng.uniform(0.08, 0.12)) * acq.zoom
  colour = _pick(rng, ("blue", "green"))
  if count == 1:
    centres = [tuple(rng.uniform(0.3, 0.7, 2))]
  else:
    centres = [(x + rng.uniform(-0.06, 0.06), y + rng.uniform(-0.12, 0.12))
               for x, y in _grid_centres(count, (0.1, 0.1, 0.9, 0.9), rows=1 if count < 3 else 2)]
  tree_centres = []
  for centre in centres:
    outline = _blob(rng, centre, radius, rng.uniform(0.7, 1.0))
    c.polygon(_blob(rng, centre, radius * 1.08, 0.9), _mix(SAND, SOIL, 0.5), alpha=200)
    c.fill_polygon(outline, c.texture(WATER[colour], mottle=0.1, grain=3, cells=3))
    angles = rng.uniform(0, 2 * math.pi, int(rng.integers(4, 10)))
    tree_centres += [(centre[0] + 1.25 * radius * math.cos(a), centre[1] + 1.25 * radius * math.sin(a))
                     for a in angles]
  _trees(c, rng, acq, tree_centres, 0.025 * acq.zoom)
  return [
      ObjectGroup("pond", count, colour, "large" if large else "small", _mean_centre(centres)),
      ObjectGroup("tree", len(tree_centres), _canopy_word(acq), relation=("around", "pond")),
  ]


def _paint_meadow(c: Canvas, rng, acq) -> list[ObjectGroup]:
  grass = _vegetation(acq)
  c.fill(c.texture(grass, mottle=0.2, grain=7, cells=3))
  for _ in range(int(rng.integers(3, 7))):
    patch = _blob(rng, tuple(rng.uniform(0, 1, 2)), rng.uniform(0.1, 0.3), rng.uniform(0.5, 1.0))
    c.polygon(patch, _jitter(_mix(grass, _pick(rng, (DRY_GRASS, LUSH_GRASS, SOIL)), 0.4), rng, 10), alpha=70)
  for centre in rng.uniform(0, 1, (250, 2)):
    c.ellipse(centre, rng.uniform(0.003, 0.008), _jitter(grass, rng, 30), alpha=140)
  groups = [ObjectGroup("grass", None, _vegetation_word(acq))]
  if rng.random() < 0.5:
    c.line(_wavy_line(rng, rng.uniform(0.3, 0.7), 0.08), DIRT_ROAD, 0.014)
    groups.append(ObjectGroup("path", 1, orientation="horizontal"))
  count = int(rng.integers(0, 6))
  if count:
    centres = [tuple(p) for p in rng.uniform(0.08, 0.92, (count, 2))]
    _trees(c, rng, acq, centres, 0.035 * acq.zoom)
    groups.append(ObjectGroup("tree", count, _canopy_word(acq), centre=_mean_centre(centres)))
  return groups


def _paint_forest(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_mix(_canopy(acq), (0, 0, 0), 0.4), mottle=0.15, cells=4))
  radius = max(0.024, rng.uniform(0.025, 0.035) * acq.zoom)  # caps the number of crowns to draw
  step = 1.5 * radius
  grid = np.arange(-radius, 1 + radius, step)
  centres = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2) + rng.uniform(-0.4, 0.4, (grid.size ** 2, 2)) * step
  _trees(c, rng, acq, centres, radius)
  groups = [ObjectGroup("tree", len(centres), _canopy_word(acq))]
  feature = rng.random()
  if feature < 0.4:
    c.line(_wavy_line(rng, rng.uniform(0.3, 0.7), 0.05), DIRT_ROAD, 0.025)
    groups.append(ObjectGroup("road", 1, orientation="horizontal"))
  elif feature < 0.75:
    centre = tuple(rng.uniform(0.25, 0.75, 2))
    c.fill_polygon(_blob(rng, centre, rng.uniform(0.1, 0.16), 0.8), c.texture(_vegetation(acq), mottle=0.15))
    groups.append(ObjectGroup("clearing", 1, centre=centre))
  return groups


_FIELD_COLOURS = {"green": (84, 128, 58), "yellow": (200, 178, 96), "brown": (132, 100, 70)}


def _paint_farmland(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(DIRT_ROAD, mottle=0.05))
  cols, rows = _pick(rng, ((2, 1), (1, 2), (2, 2), (3, 1), (3, 2), (2, 3)))
  x_edges = np.concatenate([[-0.02], (np.arange(1, cols) + rng.uniform(-0.2, 0.2, cols - 1)) / cols, [1.02]])
  y_edges = np.concatenate([[-0.02], (np.arange(1, rows) + rng.uniform(-0.2, 0.2, rows - 1)) / rows, [1.02]])
  colours, centres = [], []
  for i in range(cols):
    for j in range(rows):
      colour = _pick(rng, tuple(_FIELD_COLOURS))
      base = _FIELD_COLOURS[colour]
      if colour == "green":
        base = _mix(_vegetation(acq), base, 0.5)
      stripes = (rng.uniform(0.015, 0.035) * acq.zoom, _pick(rng, (0.0, math.pi / 2)) + rng.uniform(-0.1, 0.1),
                 0.12, 0.0)
      box = (x_edges[i] + 0.008, y_edges[j] + 0.008, x_edges[i + 1] - 0.008, y_edges[j + 1] - 0.008)
      c.fill_polygon(_box(*box), c.texture(_jitter(base, rng, 10), mottle=0.08, stripes=stripes))
      colours.append(colour)
      centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
  return _by_colour("field", colours, centres)


_SAND_COLOURS = {"yellow": (212, 184, 128), "orange": (206, 146, 90)}


def _paint_desert(c: Canvas, rng, acq) -> list[ObjectGroup]:
  colour = _pick(rng, tuple(_SAND_COLOURS))
  period = rng.uniform(0.06, 0.12) * acq.zoom
  stripes = (period, rng.uniform(0, math.pi), 0.16, 0.5)
  c.fill(c.texture(_SAND_COLOURS[colour], mottle=0.1, grain=6, cells=3, stripes=stripes))
  groups = [ObjectGroup("sand", None, colour), ObjectGroup("dune", round(1 / period))]
  if rng.random() < 0.35:
    y = rng.uniform(0.2, 0.8)
    c.line([(-0.05, y), (1.05, y + rng.uniform(-0.08, 0.08))], ASPHALT, 0.02)
    groups.append(ObjectGroup("road", 1, orientation="horizontal"))
  rocks = int(rng.integers(0, 6))
  if rocks:
    centres = [tuple(p) for p in rng.uniform(0.1, 0.9, (rocks, 2))]
    for centre in centres:
      c.shape(_blob(rng, (0, 0), 0.5, 0.8, points=10), centre, rng.uniform(0.03, 0.06) * acq.zoom,
              0.0, _jitter((96, 80, 64), rng), shadow=0.01)
    groups.append(ObjectGroup("rock", rocks, centre=_mean_centre(centres)))
  return groups


_CAR_COLOURS = ("white", "white", "black", "grey", "grey", "red", "blue")


def _paint_parking_lot(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(ASPHALT, mottle=0.08, grain=5))
  c.fill_polygon(_box(-0.01, -0.01, 1.01, 0.07), c.texture(_vegetation(acq), mottle=0.15))
  _trees(c, rng, acq, [(x, 0.035) for x in np.arange(0.04, 1, 0.09)], 0.03)
  rows = int(rng.integers(2, 5))
  car_length, stall = 0.085 * acq.zoom, 0.05 * acq.zoom
  occupancy = rng.uniform(0.5, 0.95)
  pitch = min(0.88 / rows, 2.4 * car_length)
  cars = 0
  for y in 0.54 + (np.arange(rows) - (rows - 1) / 2) * pitch:
    for x in np.arange(0.04, 0.97 - stall, stall):
      c.line([(x, y - car_length * 0.6), (x, y + car_length * 0.6)], PAINT, 0.004)
      if rng.random() < occupancy:
        _car(c, (x + stall / 2, y), car_length, _pick(rng, (math.pi / 2, -math.pi / 2)),
             _jitter(PALETTE[_pick(rng, _CAR_COLOURS)], rng, 8))
        cars += 1
  return [ObjectGroup("row", rows), ObjectGroup("car", cars)]


def _sheds(c: Canvas, rng, avoid) -> None:
  """A few small flat-roofed buildings outside the `avoid` box."""
  for _ in range(int(rng.integers(1, 5))):
    size = rng.uniform(0.05, 0.12, 2)
    x, y = rng.uniform(0.05, 0.95, 2)
    if avoid[0] - size[0] < x < avoid[2] + size[0] and avoid[1] - size[1] < y < avoid[3] + size[1]:
      continue
    c.shape(RECT, (x, y), tuple(size), 0.0, _jitter(_pick(rng, (PALETTE["white"], PALETTE["grey"])), rng), shadow=0.01)


def _paint_storage_tanks(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_mix(CONCRETE, SOIL, rng.uniform(0.1, 0.5)), mottle=0.1))
  count = int(rng.integers(1, 7))
  large = rng.random() < 0.5 and count <= 4
  radius = (rng.uniform(0.1, 0.13) if large else rng.uniform(0.05, 0.075)) * acq.zoom
  cols = math.ceil(math.sqrt(count))
  rows = -(-count // cols)
  span = 2.5 * radius
  origin = rng.uniform(radius + 0.04, 1 - radius - 0.04 - span * (np.array([cols, rows]) - 1))
  centres = [(origin[0] + span * (j % cols), origin[1] + span * (j // cols)) for j in range(count)]
  colour = _pick(rng, ("white", "white", "grey", "green"))
  c.line([(-0.05, origin[1] - 1.6 * radius), (1.05, origin[1] - 1.6 * radius)], (110, 110, 108), 0.012)
  for centre in centres:
    c.rect((centre[0] - 1.2 * radius, centre[1] - 1.2 * radius, centre[0] + 1.2 * radius, centre[1] + 1.2 * radius),
           (120, 110, 92), alpha=90)
  for start, end in zip(centres, centres[1:]):
    c.line([start, end], (150, 150, 146), 0.01)
  _sheds(c, rng, avoid=(origin[0] - 1.3 * radius, origin[1] - 1.3 * radius,
                        centres[-1][0] + 1.3 * radius, centres[-1][1] + 1.3 * radius))
  for centre in centres:
    _tank(c, centre, radius, _jitter(PALETTE[colour], rng, 6))
  return [ObjectGroup("tank", count, colour, "large" if large else "small", _mean_centre(centres))]


def _baseball_diamond(c: Canvas, home, radius: float, heading: float, grass) -> None:
  degrees = math.degrees(heading)
  c.pieslice(home, radius, degrees - 45, degrees + 45, _mix(grass, (255, 255, 255), 0.12))
  c.pieslice(home, 0.55 * radius, degrees - 45, degrees + 45, (184, 136, 92))
  side = 0.3 * radius
  diamond = [home] + [(home[0] + d * math.cos(heading + a), home[1] + d * math.sin(heading + a))
                      for d, a in ((side, -math.pi / 4), (side * math.sqrt(2), 0.0), (side, math.pi / 4))]
  c.polygon(diamond, _mix(grass, (255, 255, 255), 0.2))
  for a in (-math.pi / 4, math.pi / 4):
    c.line([home, (home[0] + radius * math.cos(heading + a), home[1] + radius * math.sin(heading + a))], PAINT, 0.006)
  c.ellipse(_mean_centre(diamond), 0.025 * radius, (184, 136, 92))
  c.ellipse(home, 0.08 * radius, (184, 136, 92))


def _paint_baseball_field(c: Canvas, rng, acq) -> list[ObjectGroup]:
  grass = _vegetation(acq)
  c.fill(c.texture(grass, mottle=0.12, cells=4))
  count = int(rng.integers(1, 4))
  radius = (rng.uniform(0.5, 0.6) if count == 1 else rng.uniform(0.34, 0.4)) * acq.zoom
  homes = {1: [(0.2, 0.8)], 2: [(0.12, 0.55), (0.88, 0.55)], 3: [(0.1, 0.45), (0.5, 0.95), (0.9, 0.45)]}[count]
  aims = {1: [(0.65, 0.3)], 2: [(0.35, 0.1), (0.65, 0.1)], 3: [(0.35, 0.05), (0.5, 0.45), (0.65, 0.05)]}[count]
  shift = rng.uniform(-0.05, 0.05, 2)
  centres = []
  for (hx, hy), (ax, ay) in zip(homes, aims):
    home = (hx + shift[0], hy + shift[1])
    heading = math.atan2(ay - hy, ax - hx)
    _baseball_diamond(c, home, radius, heading, grass)
    centres.append((home[0] + 0.4 * radius * math.cos(heading), home[1] + 0.4 * radius * math.sin(heading)))
  edge = [(x, _pick(rng, (0.03, 0.97))) for x in rng.uniform(0, 1, 10)]
  _trees(c, rng, acq, edge, 0.03)
  return [ObjectGroup("diamond", count, centre=_mean_centre(centres))]


_COURT_COLOURS = {"green": ((70, 128, 82), (46, 96, 60)), "blue": ((54, 96, 160), (70, 124, 86)),
                  "red": ((170, 84, 60), (126, 70, 56))}


def _tennis_court(c: Canvas, centre, length: float, surface, surround) -> None:
  width = 0.46 * length
  c.shape(RECT, centre, (1.35 * width, 1.25 * length), 0.0, surround)
  c.shape(RECT, centre, (width, length), 0.0, surface)
  x, y = centre
  w, l, s = width / 2, length / 2, 0.37 * width
  for points in ([(x - w, y - l), (x + w, y - l), (x + w, y + l), (x - w, y + l), (x - w, y - l)],
                 [(x - w, y), (x + w, y)], [(x - s, y - l), (x - s, y + l)], [(x + s, y - l), (x + s, y + l)],
                 [(x - s, y - 0.54 * l), (x + s, y - 0.54 * l)], [(x - s, y + 0.54 * l), (x + s, y + 0.54 * l)],
                 [(x, y - 0.54 * l), (x, y + 0.54 * l)]):
    c.line(points, PAINT, 0.004)


def _paint_tennis_court(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_pick(rng, (_vegetation(acq), CONCRETE)), mottle=0.12, cells=4))
  count = int(rng.integers(1, 5))
  colour = _pick(rng, tuple(_COURT_COLOURS))
  surface, surround = (_jitter(rgb, rng, 8) for rgb in _COURT_COLOURS[colour])
  length = min(0.36 * acq.zoom, 0.85 / (count * 0.62))
  spacing = 0.62 * length
  start = rng.uniform(0.5 * spacing + 0.04, 1 - (count - 0.5) * spacing - 0.04)
  y = rng.uniform(0.35, 0.65)
  centres = [(start + i * spacing, y) for i in range(count)]
  for centre in centres:
    _tennis_court(c, centre, length, surface, surround)
  trees = [(x, _pick(rng, (y - 0.7 * length - 0.05, y + 0.7 * length + 0.05))) for x in rng.uniform(0, 1, 8)]
  _trees(c, rng, acq, trees, 0.03)
  return [ObjectGroup("court", count, colour, centre=_mean_centre(centres))]


_TRACK_COLOURS = {"red": (168, 72, 58), "blue": (60, 96, 152), "green": (62, 120, 80)}


def _paint_playground(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_pick(rng, (CONCRETE, _vegetation(acq))), mottle=0.1, cells=4))
  colour = _pick(rng, ("red", "red", "blue", "green"))
  centre = tuple(rng.uniform(0.42, 0.58, 2))
  half_length, half_width = 0.42 * acq.zoom, rng.uniform(0.2, 0.26) * acq.zoom
  c.stadium(centre, half_length, half_width, fill=_jitter(_TRACK_COLOURS[colour], rng, 8))
  lanes = 0.055 * acq.zoom
  for inset in lanes * np.arange(1, 4) / 4:
    c.stadium(centre, half_length - inset, half_width - inset, outline=PAINT)
  c.stadium(centre, half_length - lanes, half_width - lanes, fill=_jitter(LUSH_GRASS, rng, 8))
  pitch = (centre[0] - 0.55 * half_length, centre[1] - 0.6 * half_width,
           centre[0] + 0.55 * half_length, centre[1] + 0.6 * half_width)
  c.line(_box(*pitch) + [_box(*pitch)[0]], PAINT, 0.005)
  c.line([(centre[0], pitch[1]), (centre[0], pitch[3])], PAINT, 0.005)
  c.ellipse(centre, 0.12 * half_width, None, outline=PAINT, width=0.005)
  for x in (0.0, 1.0):
    _trees(c, rng, acq, [(x + rng.uniform(-0.03, 0.03), y) for y in rng.uniform(0, 1, 5)], 0.035)
  return [
      ObjectGroup("track", 1, colour, centre=centre, orientation="horizontal"),
      ObjectGroup("pitch", 1, "green", centre=centre, relation=("inside", "track")),
  ]


def _paint_intersection(c: Canvas, rng, acq) -> list[ObjectGroup]:
  urban = rng.random() < 0.6
  c.fill(c.texture(CONCRETE if urban else _vegetation(acq), mottle=0.12, cells=4))
  centre = rng.uniform(0.4, 0.6, 2)
  half = rng.uniform(0.06, 0.08) * acq.zoom
  arms = [(1, 0), (-1, 0), (0, 1), (0, -1)]
  if rng.random() < 0.35:
    arms.pop(int(rng.integers(4)))
  for sx, sy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
    size = rng.uniform(0.14, 0.3, 2)
    corner = (centre[0] + sx * (half + 0.04 + size[0] / 2), centre[1] + sy * (half + 0.04 + size[1] / 2))
    if urban:
      roof = _jitter(_pick(rng, (PALETTE["grey"], PALETTE["white"], (150, 110, 90))), rng)
      c.shape(RECT, corner, tuple(size), 0.0, roof, shadow=0.02)
    else:
      _trees(c, rng, acq, [tuple(p) for p in corner + rng.uniform(-0.1, 0.1, (3, 2))], 0.03)
  c.rect((centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half), ASPHALT)
  car_colours, car_centres = [], []
  for dx, dy in arms:
    far = (centre[0] + 1.2 * dx, centre[1] + 1.2 * dy)
    c.line([tuple(centre), far], ASPHALT, 2 * half)
    near = (centre[0] + dx * (half + 0.015), centre[1] + dy * (half + 0.015))
    c.line([(near[0] + dx * 0.03, near[1] + dy * 0.03), far], PAINT, 0.005)
    for t in np.arange(-0.8, 0.85, 0.2):
      stripe = (near[0] - dy * t * half, near[1] + dx * t * half)
      c.line([stripe, (stripe[0] + dx * 0.022, stripe[1] + dy * 0.022)], PAINT, 0.01)
  for _ in range(int(rng.integers(1, 7))):
    dx, dy = _pick(rng, arms)
    lane = _pick(rng, (-1, 1))
    distance = rng.uniform(half + 0.1, 0.45)
    car_centres.append((centre[0] + dx * distance + dy * lane * half / 2,
                        centre[1] + dy * distance - dx * lane * half / 2))
    car_colours.append(_pick(rng, _CAR_COLOURS))
    _car(c, car_centres[-1], 0.085 * acq.zoom, math.atan2(dy, dx) + (math.pi if lane < 0 else 0.0),
         _jitter(PALETTE[car_colours[-1]], rng, 6))
  return [ObjectGroup("road", len(arms)), *_by_colour("car", car_colours, car_centres, relation=("on", "road"))]


def _paint_industrial(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_mix(CONCRETE, SOIL, 0.2), mottle=0.1))
  count = int(rng.integers(2, 7))
  rows = 1 if count <= 3 else 2
  palette = [_pick(rng, ("grey", "blue", "white", "red")) for _ in range(int(rng.integers(1, 3)))]
  slots = _grid_centres(count, (0.03, 0.03, 0.97, 0.97), rows)
  cols = -(-count // rows)
  colours = []
  for centre in slots:
    colours.append(_pick(rng, palette))
    size = (0.94 / cols * rng.uniform(0.6, 0.82), 0.94 / rows * rng.uniform(0.55, 0.8))
    roof = _jitter(PALETTE[colours[-1]], rng, 8)
    corners = c.shape(RECT, centre, size, 0.0, roof, shadow=0.025)
    for t in np.linspace(0.1, 0.9, 7):
      x = corners[0][0] + t * size[0]
      c.line([(x, corners[0][1]), (x, corners[2][1])], _mix(roof, (0, 0, 0), 0.18), 0.004)
  for _ in range(int(rng.integers(2, 6))):
    x, y = rng.uniform(0.05, 0.95, 2)
    c.shape(RECT, (x, y), (0.08, 0.03), _pick(rng, (0.0, math.pi / 2)), _jitter(PALETTE["white"], rng, 20),
            shadow=0.006)
  return _by_colour("factory", colours, slots, size="large")


def _paint_dense_residential(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(ASPHALT, mottle=0.06, grain=5))
  colour = _pick(rng, ("red", "grey", "brown", "white", "blue"))
  roofs = (PALETTE[colour], PALETTE["grey"], PALETTE["brown"], PALETTE["white"])
  block_w, block_h = rng.uniform(0.3, 0.45), rng.uniform(0.16, 0.22) * acq.zoom
  road = 0.035
  park = (int(rng.integers(0, 3)), int(rng.integers(0, 3))) if rng.random() < 0.4 else None
  count, groups = 0, []
  offset = rng.uniform(-0.1, 0)
  for j, y in enumerate(np.arange(offset, 1.0, block_h + road)):
    for i, x in enumerate(np.arange(offset, 1.0, block_w + road)):
      box = (x, y, x + block_w, y + block_h)
      if (i, j) == park:
        c.fill_polygon(_box(*box), c.texture(_vegetation(acq), mottle=0.15))
        _trees(c, rng, acq, [(rng.uniform(x, x + block_w), rng.uniform(y, y + block_h)) for _ in range(6)], 0.025)
        groups.append(ObjectGroup("park", 1, centre=((2 * x + block_w) / 2, (2 * y + block_h) / 2)))
        continue
      count += _pack_houses(c, rng, box, acq.zoom, lambda: roofs[0] if rng.random() < 0.75 else _pick(rng, roofs))
  return [ObjectGroup("house", count, colour), *groups]


def _paint_medium_residential(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_vegetation(acq), mottle=0.15, cells=5))
  colour = _pick(rng, ("red", "grey", "brown", "white", "blue"))
  road_ys = [rng.uniform(0.25, 0.35), rng.uniform(0.65, 0.75)]
  for y in road_ys:
    c.line([(-0.05, y), (1.05, y)], ASPHALT, 0.04)
  spacing = rng.uniform(0.16, 0.22)
  houses, pools = 0, []
  for y in road_ys:
    for side in (-1, 1):
      for x in np.arange(rng.uniform(0.04, 0.1), 0.95, spacing):
        centre = (x + rng.uniform(-0.02, 0.02), y + side * 0.085)
        c.line([(centre[0], y), centre], (150, 150, 146), 0.015)
        _house(c, rng, centre, 0.09 * acq.zoom, 0.07 * acq.zoom, 0.0,
               PALETTE[colour] if rng.random() < 0.8 else PALETTE["grey"])
        houses += 1
        if rng.random() < 0.12 and len(pools) < 3:
          pools.append((centre[0], y + side * 0.16))
          c.shape(RECT, pools[-1], (0.05, 0.03), 0.0, (70, 160, 200))
  tree_centres = [tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(8, 20)), 2))
                  if min(abs(p[1] - y) for y in road_ys) > 0.13]
  _trees(c, rng, acq, tree_centres, 0.028)
  groups = [ObjectGroup("house", houses, colour), ObjectGroup("tree", len(tree_centres), _canopy_word(acq))]
  if pools:
    groups.append(ObjectGroup("pool", len(pools), "blue", centre=_mean_centre(pools)))
  return groups


def _paint_sparse_residential(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(_vegetation(acq), mottle=0.18, cells=3))
  road = _wavy_line(rng, rng.uniform(0.2, 0.8), 0.06)
  c.line(road, _pick(rng, (ASPHALT, DIRT_ROAD)), 0.03)
  count = int(rng.integers(2, 7))
  colour = _pick(rng, ("red", "grey", "brown", "white", "blue"))
  cluster = rng.uniform(0.25, 0.75, 2)
  road_xs, road_ys = zip(*road)
  centres = []
  for _ in range(count):
    x = float(np.clip(cluster[0] + rng.uniform(-0.25, 0.25), 0.08, 0.92))
    road_y = float(np.interp(x, road_xs, road_ys))
    y = road_y + _pick(rng, (-1, 1)) * rng.uniform(0.08, 0.16)
    centres.append((x, y))
    c.line([(x, road_y), (x, y)], (150, 146, 136), 0.012)
    _house(c, rng, (x, y), 0.1 * acq.zoom, 0.075 * acq.zoom, rng.uniform(-0.2, 0.2), PALETTE[colour])
  trees = [tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(6, 16)), 2))
           if min(math.dist(p, h) for h in centres) > 0.09]
  _trees(c, rng, acq, trees, 0.03)
  return [
      ObjectGroup("house", count, colour, centre=_mean_centre(centres), relation=("near", "road")),
      ObjectGroup("tree", len(trees), _canopy_word(acq)),
      ObjectGroup("road", 1, orientation="horizontal"),
  ]


def _paint_church(c: Canvas, rng, acq) -> list[ObjectGroup]:
  c.fill(c.texture(ASPHALT, mottle=0.06))
  centre = tuple(rng.uniform(0.38, 0.62, 2))
  half = rng.uniform(0.22, 0.28)
  square = (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
  houses = 0
  for j, y in enumerate(np.arange(-0.1, 1.0, 0.22)):
    for x in np.arange(-0.05 * j, 1.0, 0.3):
      box = (x, y, x + 0.27, y + 0.185)
      if box[2] > square[0] and box[0] < square[2] and box[3] > square[1] and box[1] < square[3]:
        continue
      houses += _pack_houses(c, rng, box, acq.zoom,
                             lambda: _pick(rng, (PALETTE["red"], PALETTE["brown"], PALETTE["grey"])))
  c.fill_polygon(_box(*square), c.texture(PAVING, mottle=0.05, grain=6))
  colour = _pick(rng, ("grey", "red", "green", "brown"))
  roof = _jitter(PALETTE[colour], rng, 8)
  angle = _pick(rng, (0.0, math.pi / 2)) + rng.uniform(-0.1, 0.1)
  length = 1.5 * half
  c.shape(CROSS, centre, length, angle, roof, shadow=0.02)
  tower = (centre[0] - 0.5 * length * math.cos(angle), centre[1] - 0.5 * length * math.sin(angle))
  c.shape(RECT, tower, 0.09 * length, angle, _mix(roof, (0, 0, 0), 0.25), shadow=0.03)
  c.line(_place([(-0.5, 0.0), (0.5, 0.0)], centre, length, angle), _mix(roof, (0, 0, 0), 0.3), 0.006)
  corners = _box(*square)
  _trees(c, rng, acq, [(x + 0.06 * np.sign(centre[0] - x), y + 0.06 * np.sign(centre[1] - y)) for x, y in corners],
         0.035)
  return [
      ObjectGroup("church", 1, colour, centre=centre),
      ObjectGroup("house", houses, relation=("around", "church")),
  ]


_PAINTERS: dict[str, Callable[[Canvas, np.random.Generator, Acquisition], list[ObjectGroup]]] = {
    "airport": _paint_airport,
    "harbour": _paint_harbour,
    "beach": _paint_beach,
    "river": _paint_river,
    "bridge": _paint_bridge,
    "pond": _paint_pond,
    "meadow": _paint_meadow,
    "forest": _paint_forest,
    "farmland": _paint_farmland,
    "desert": _paint_desert,
    "parking_lot": _paint_parking_lot,
    "storage_tanks": _paint_storage_tanks,
    "baseball_field": _paint_baseball_field,
    "tennis_court": _paint_tennis_court,
    "playground": _paint_playground,
    "intersection": _paint_intersection,
    "industrial": _paint_industrial,
    "dense_residential": _paint_dense_residential,
    "medium_residential": _paint_medium_residential,
    "sparse_residential": _paint_sparse_residential,
    "church": _paint_church,
}
SCENE_CLASSES: tuple[str, ...] = tuple(_PAINTERS)


# --------------------------------------------------------------------------- acquisition

# Sensor -> (min, max) ground sample distance in metres.
SENSORS = {
    "WorldView-2": (0.46, 0.62),
    "WorldView-3": (0.31, 0.45),
    "GeoEye-1": (0.41, 0.55),
    "Gaofen-2": (0.8, 1.0),
    "Sentinel-2": (10.0, 10.0),
}
# Decametric imagery only shows landscapes; its first images date from mid 2015.
_LANDSCAPES = frozenset({"river", "pond", "meadow", "forest", "farmland", "desert", "beach"})
_SENTINEL_2_START = datetime.date(2015, 7, 1)

# Region -> (lat_min, lat_max, lon_min, lon_max).
_REGIONS = {
    "north_china_plain": (34.0, 40.0, 113.0, 120.0),
    "yangtze_delta": (29.0, 32.5, 118.0, 122.0),
    "pearl_river_delta": (21.5, 23.5, 112.0, 114.5),
    "japan": (33.0, 38.0, 132.0, 141.0),
    "us_east_coast": (30.0, 41.0, -81.0, -72.0),
    "us_midwest": (38.0, 45.0, -98.0, -85.0),
    "us_southwest": (31.0, 37.0, -117.0, -106.0),
    "western_europe": (44.0, 53.0, -2.0, 12.0),
    "mediterranean_coast": (36.0, 44.0, -5.0, 16.0),
    "scandinavia": (58.0, 66.0, 10.0, 28.0),
    "sahara": (18.0, 30.0, -8.0, 25.0),
    "arabian_peninsula": (17.0, 28.0, 40.0, 55.0),
    "gobi": (40.0, 45.0, 95.0, 110.0),
    "amazon": (-10.0, -2.0, -70.0, -52.0),
    "southeast_australia": (-38.0, -28.0, 140.0, 153.0),
    "queensland_coast": (-28.0, -16.0, 145.0, 153.0),
    "central_australia": (-28.0, -20.0, 125.0, 140.0),
}
_URBAN = ("north_china_plain", "yangtze_delta", "pearl_river_delta", "japan", "us_east_coast", "western_europe",
          "southeast_australia")
_COASTAL = ("pearl_river_delta", "japan", "us_east_coast", "mediterranean_coast", "queensland_coast")
_RURAL = ("north_china_plain", "us_midwest", "western_europe", "southeast_australia", "scandinavia")
_SCENE_REGIONS = {
    "harbour": _COASTAL,
    "beach": _COASTAL,
    "desert": ("sahara", "arabian_peninsula", "gobi", "us_southwest", "central_australia"),
    "forest": ("scandinavia", "amazon", "western_europe", "us_east_coast", "japan"),
    "farmland": ("us_midwest", "north_china_plain", "western_europe", "southeast_australia"),
    "meadow": ("western_europe", "us_midwest", "scandinavia", "southeast_australia"),
    "river": _RURAL + ("amazon", "yangtze_delta"),
    "pond": _RURAL + ("yangtze_delta",),
    "sparse_residential": _RURAL + ("us_east_coast",),
    "baseball_field": ("us_east_coast", "us_midwest", "japan"),
}
_CHINA = frozenset({"north_china_plain", "yangtze_delta", "pearl_river_delta"})


def _sample_acquisition(rng: np.random.Generator, scene: str) -> Acquisition:
  """Location, date and sensor, mildly correlated with the scene class."""
  region = _pick(rng, _SCENE_REGIONS.get(scene, _URBAN))
  lat_min, lat_max, lon_min, lon_max = _REGIONS[region]
  sensors = ["WorldView-2", "WorldView-3", "GeoEye-1", "Gaofen-2"]
  if region in _CHINA:
    sensors += ["Gaofen-2", "Gaofen-2"]
  if scene in _LANDSCAPES:
    sensors += ["Sentinel-2", "Sentinel-2"]
  sensor = _pick(rng, sensors)
  first = _SENTINEL_2_START if sensor == "Sentinel-2" else datetime.date(2015, 1, 1)
  last = datetime.date(2024, 12, 31)
  date = first + datetime.timedelta(days=int(rng.integers((last - first).days + 1)))
  gsd_min, gsd_max = SENSORS[sensor]
  return Acquisition(
      sensor=sensor,
      gsd=round(float(rng.uniform(gsd_min, gsd_max)), 2),
      date=date.isoformat(),
      lat=round(float(rng.uniform(lat_min, lat_max)), 4),
      lon=round(float(rng.uniform(lon_min, lon_max)), 4),
  )


# --------------------------------------------------------------------------- rendering


def _supersampling(image_size: int) -> int:
  """Canvas/output size ratio: at least 2, and a canvas of at least 128 pixels."""
  return max(2, math.ceil(128 / image_size))


def _radiometry(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Global brightness, contrast, per-band gain, haze and sensor noise."""
  image = image.astype(np.float32)
  mean = image.mean()
  image = (image - mean) * rng.uniform(0.8, 1.2) + mean
  image = image * rng.uniform(0.85, 1.15) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
  haze = rng.uniform(0.0, 0.15)
  image = (1 - haze) * image + haze * _HAZE
  image = image + rng.normal(0.0, 2.0, image.shape).astype(np.float32)
  return _to_uint8(image)


def _dihedral_point(centre, quarter_turns: int, flip: bool) -> tuple[float, float]:
  """Where a normalised point goes under `np.rot90(image, quarter_turns)` then a left-right flip."""
  x, y = centre
  for _ in range(quarter_turns):
    x, y = y, 1.0 - x
  return (1.0 - x, y) if flip else (x, y)


def _dihedral_group(group: ObjectGroup, quarter_turns: int, flip: bool) -> ObjectGroup:
  centre = None if group.centre is None else _dihedral_point(group.centre, quarter_turns, flip)
  orientation = group.orientation
  if quarter_turns % 2 and orientation is not None:
    orientation = "vertical" if orientation == "horizontal" else "horizontal"
  return dataclasses.replace(group, centre=centre, orientation=orientation)


def render_scene(scene: str, acquisition: Acquisition, layout_rng: np.random.Generator,
                 pixel_rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, Layout]:
  """Paints `scene` as an `image_size`^2 uint8 RGB image and returns it with its layout.

  `layout_rng` decides everything a caption can mention, `pixel_rng` only noise, so
  the layout is the same at every `image_size`.
  """
  factor = _supersampling(image_size)
  canvas = Canvas(image_size * factor, pixel_rng)
  groups = _PAINTERS[scene](canvas, layout_rng, acquisition)
  sharp = np.asarray(canvas.image, np.float32)
  sharp = sharp + pixel_rng.normal(0.0, 4.0, sharp.shape[:2] + (1,)).astype(np.float32)
  image = _radiometry(np.asarray(Image.fromarray(_to_uint8(sharp)).reduce(factor)), pixel_rng)
  quarter_turns, flip = int(layout_rng.integers(4)), bool(layout_rng.random() < 0.5)
  image = np.rot90(image, quarter_turns)
  image = np.ascontiguousarray(image[:, ::-1] if flip else image)
  layout = Layout(scene, tuple(_dihedral_group(g, quarter_turns, flip) for g in groups))
  return image, layout


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  if split not in SPLIT_CODES:
    raise ValueError(f"Unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}.")
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative, got {seed=}, {index=}.")
  return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


def sample_scene(seed: int, split: str, index: int) -> str:
  """The scene class of an example (cheap: no rendering).

  Stratified: every block of len(SCENE_CLASSES) consecutive indices holds each class
  once, in a random order drawn per block, so any split is balanced to within one.
  """
  block, position = divmod(index, len(SCENE_CLASSES))
  order = _rng(seed, split, block, _SCENE_STREAM).permutation(len(SCENE_CLASSES))
  return SCENE_CLASSES[order[position]]


def generate_example(seed: int, split: str, index: int, image_size: int = 64, *,
                     with_layout: bool = False) -> dict:
  """Generates example `index` of `split`: image, 5 captions, scene, keywords, metadata.

  Args:
    seed: dataset seed (non-negative).
    split: "train", "val" or "test".
    index: example index within the split (non-negative).
    image_size: output height and width in pixels.
    with_layout: also return the ground-truth `Layout` under "layout".

  Returns:
    A dict with image (uint8 [S, S, 3]), captions (5 str), scene (str), keywords
    (1-5 str), sensor (str), gsd (float, metres), date ("YYYY-MM-DD"), lat, lon.
  """
  scene = sample_scene(seed, split, index)
  acquisition = _sample_acquisition(_rng(seed, split, index, _ACQUISITION_STREAM), scene)
  image, layout = render_scene(scene, acquisition, _rng(seed, split, index, _LAYOUT_STREAM),
                               _rng(seed, split, index, _PIXEL_STREAM), image_size)
  example = {
      "image": image,
      "captions": captions_lib.make_captions(layout, _rng(seed, split, index, _CAPTION_STREAM)),
      "scene": scene,
      "keywords": captions_lib.keywords(layout),
      **dataclasses.asdict(acquisition),
  }
  if with_layout:
    example["layout"] = layout
  return example
