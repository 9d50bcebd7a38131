"""Metadata prompts: an image's acquisition metadata written out as its caption (CCLS2T's text side).

`config.dataset.captions = "metadata_prompt"` makes `sources.open_split` wrap the split's source so that every
record's "captions" is the one prompt of docs/METHODS.md Part B §4.2.1's template, e.g.

  "an optical image from WorldView-2 with 0.58 m GSD, acquired on 2024-09-02 (autumn), centred at 63.36, 24.27,
  scene: river."

Design choices (ours: the paper's templates are not public):
- one prompt per image (the dataset's own captions are replaced, not appended);
- the datasets name one platform/sensor string, so the template has a single `{sensor}` slot where docs/METHODS.md
  writes `{satellite}/{sensor}`;
- season = meteorological season of the month (Dec-Feb winter, ...), swapped south of the equator;
- GSD, latitude and longitude with 2 decimals (the continuous values reach the text tower exactly through the
  `spacetime` field, `rsalign_jax.data.fields`); the date stays yyyy-mm-dd;
- the scene clause only where the dataset has a `scene` ClassLabel, its name with underscores as spaces.
"""
import dataclasses
import datetime

CAPTION_MODES = ("captions", "metadata_prompt")
METADATA_FEATURES = ("sensor", "gsd", "date", "lat", "lon")
_SEASONS = ("winter", "spring", "summer", "autumn")


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """The parsed acquisition metadata of one record."""
  sensor: str
  gsd: float
  date: datetime.date
  lat: float
  lon: float


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_acquisition(record, purpose):
  """The record's metadata; `purpose` names the option that needs it in the error for a record without it."""
  missing = [name for name in METADATA_FEATURES if name not in record]
  if missing:
    raise ValueError(f"{purpose} needs the metadata features {METADATA_FEATURES}; the record has no "
                     f"{', '.join(map(repr, missing))}")
  date = _text(record["date"])
  try:
    parsed = datetime.date.fromisoformat(date)
  except ValueError:
    raise ValueError(f"{purpose}: record 'date' {date!r} is not a yyyy-mm-dd date") from None
  return Acquisition(_text(record["sensor"]), float(record["gsd"]), parsed, float(record["lat"]),
                     float(record["lon"]))


def season(date, lat):
  """Meteorological season of `date` at latitude `lat` (southern hemisphere shifted by half a year)."""
  month = date.month if lat >= 0 else (date.month + 5) % 12 + 1
  return _SEASONS[(month % 12) // 3]


def format_prompt(record, scene_names=None):
  """The prompt of one record; `scene_names` maps the `scene` ClassLabel index to its name (None: no scene)."""
  meta = read_acquisition(record, "dataset.captions='metadata_prompt'")
  prompt = (f"an optical image from {meta.sensor} with {meta.gsd:.2f} m GSD, acquired on {meta.date.isoformat()} "
            f"({season(meta.date, meta.lat)}), centred at {meta.lat:.2f}, {meta.lon:.2f}")
  if scene_names is not None:
    prompt += f", scene: {scene_names[int(record['scene'])].replace('_', ' ')}"
  return prompt + "."


class PromptSource:
  """A random-access source whose records carry `captions = [prompt]`; every other feature passes through."""

  def __init__(self, source, scene_names=None):
    self._source = source
    self._scene_names = scene_names

  def __len__(self):
    return len(self._source)

  def __getitem__(self, position):
    record = dict(self._source[position])
    record["captions"] = [format_prompt(record, self._scene_names)]
    return record


def with_captions(source, features, mode, dataset_name):
  """`source` with the captions `mode` selects: 'captions' (the dataset's own) or 'metadata_prompt'.

  features: the dataset's feature dict (tfds `builder.info.features` or any mapping of feature names).
  """
  if mode not in CAPTION_MODES:
    raise ValueError(f"dataset.captions={mode!r}: expected one of {CAPTION_MODES}")
  if mode == "captions":
    return source
  missing = [name for name in METADATA_FEATURES if name not in features]
  if missing:
    raise ValueError(f"dataset.captions='metadata_prompt': dataset {dataset_name!r} has no "
                     f"{', '.join(map(repr, missing))} feature(s); prompts need {', '.join(METADATA_FEATURES)} "
                     "(the synthetic benchmark carries them; RSICD, RSITMD, UCM and Sydney captions do not)")
  scene_names = features["scene"].names if "scene" in features else None
  return PromptSource(source, scene_names)
