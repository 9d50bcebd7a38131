"""Caption grammar: turns a scene `Layout` into five RSICD-style sentences.

Captions are lowercase, space-separated and end with " .". Each one names the
scene (or a synonym) and usually states one or two facts that are true of the
image: a count ("three planes"), a colour ("red roofs"), a size, a position on
the image ("in the top left corner"), a relation ("next to the runway") or an
orientation ("from left to right"). Synonyms for scenes, nouns, verbs and
quantifiers make captions of one class near-duplicates with varied wording, so
that telling images of one class apart needs exactly these facts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from rsalign_jax.data.synthetic_rs.scenes import Layout, ObjectGroup

NUM_CAPTIONS = 5
# Share of images whose 5 caption slots are filled by repeating 1-4 distinct
# sentences, as in RSICD.
REPEAT_PROBABILITY = 0.25
MAX_KEYWORDS = 5

SCENE_NOUNS = {
    "airport": ("airport", "airfield", "aerodrome"),
    "harbour": ("port", "harbor", "harbour"),
    "beach": ("beach", "seaside", "sandy beach"),
    "river": ("river area", "riverside", "river valley"),
    "bridge": ("bridge area", "river crossing", "bridge site"),
    "pond": ("pond area", "lake area", "lakeside"),
    "meadow": ("meadow", "grassland", "pasture"),
    "forest": ("forest", "woodland", "wooded area"),
    "farmland": ("farmland", "agricultural area", "cropland"),
    "desert": ("desert", "desert area", "sandy desert"),
    "parking_lot": ("parking lot", "car park", "parking area"),
    "storage_tanks": ("storage tank area", "tank farm", "oil depot"),
    "baseball_field": ("ballpark", "baseball park", "baseball ground"),
    "tennis_court": ("tennis center", "tennis club", "tennis court area"),
    "playground": ("playground", "sports ground", "athletic ground"),
    "intersection": ("intersection", "crossroads", "road junction"),
    "industrial": ("industrial area", "industrial park", "factory zone"),
    "dense_residential": ("dense residential area", "crowded residential district", "densely built neighborhood"),
    "medium_residential": ("residential area", "suburban neighborhood", "medium residential area"),
    "sparse_residential": ("sparse residential area", "rural settlement", "countryside village"),
    "church": ("church square", "church area", "old town center"),
}
SCENE_ADJECTIVES = {
    "airport": ("large", "busy"),
    "harbour": ("large", "busy"),
    "beach": ("long", "quiet", "beautiful"),
    "forest": ("dense", "thick", "large"),
    "desert": ("vast", "dry", "barren"),
    "meadow": ("open", "flat", "large"),
    "farmland": ("large", "flat"),
    "parking_lot": ("large", "busy"),
    "industrial": ("large",),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
COLOUR_WORDS = {
    "white": ("white",),
    "grey": ("grey", "gray"),
    "black": ("black", "dark"),
    "red": ("red",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "green": ("green",),
    "orange": ("orange",),
    "brown": ("brown",),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


@dataclasses.dataclass(frozen=True)
class Noun:
  """How a layout object kind can be named, counted and given a verb."""

  singular: tuple[str, ...]
  plural: tuple[str, ...] = ()
  verbs: tuple[str, ...] = ("are", "can be seen")
  verbs_singular: tuple[str, ...] = ("is", "can be seen")
  single: tuple[str, ...] = ("a", "one")  # determiners when count == 1
  gerunds: tuple[str, ...] = ("running",)  # for "... with a road running from left to right"


NOUNS = {
    "plane": Noun(("plane", "airplane", "aircraft"), ("planes", "airplanes", "aircraft"),
                  ("are parked", "stand", "are lined up"), ("is parked", "stands")),
    "runway": Noun(("runway", "airstrip"), verbs_singular=("runs", "stretches", "extends"), single=("a", "the"),
                   gerunds=("running", "stretching")),
    "ship": Noun(("ship", "boat", "vessel"), ("ships", "boats", "vessels"), ("are docked", "are moored", "lie"),
                 ("is docked", "is moored", "lies")),
    "sea": Noun(("sea", "ocean", "water"), verbs_singular=("lies", "is"), single=("the",)),
    "umbrella": Noun(("umbrella", "parasol", "beach umbrella"), ("umbrellas", "parasols", "beach umbrellas"),
                     ("stand", "are set up", "are placed"), ("stands", "is set up", "is placed")),
    "river": Noun(("river",), verbs_singular=("flows", "winds", "runs"), single=("a", "the"),
                  gerunds=("flowing", "winding", "running")),
    "tree": Noun(("tree",), ("trees",), ("grow", "stand", "are planted"), ("grows", "stands", "is planted")),
    "bridge": Noun(("bridge",), ("bridges",), ("are built", "stand"), ("is built", "stands")),
    "car": Noun(("car", "vehicle"), ("cars", "vehicles")),
    "pond": Noun(("pond", "lake"), ("ponds", "lakes"), ("lie", "are", "can be seen"), ("lies", "is")),
    "grass": Noun(("grass",), verbs_singular=("grows", "is everywhere")),
    "path": Noun(("path", "trail", "dirt road"), verbs_singular=("runs", "passes", "winds"), single=("a",),
                 gerunds=("running", "passing", "winding")),
    "road": Noun(("road", "street"), ("roads", "streets"), ("meet", "cross", "join"), ("runs", "passes", "goes"),
                 single=("a", "the"), gerunds=("running", "passing", "going")),
    "clearing": Noun(("clearing", "open area", "glade"), verbs_singular=("is", "lies"), single=("a",)),
    "field": Noun(("field", "plot", "patch of farmland"), ("fields", "plots", "patches of farmland"),
                  ("are", "lie", "can be seen"), ("is", "lies")),
    "sand": Noun(("sand",), verbs_singular=("is everywhere", "stretches")),
    "dune": Noun(("dune", "sand dune", "ripple"), ("dunes", "sand dunes", "ripples"),
                 ("are", "can be seen", "stretch")),
    "rock": Noun(("rock", "boulder"), ("rocks", "boulders"), ("are scattered", "lie", "are"), ("lies", "is")),
    "row": Noun(("row of cars", "line of cars"), ("rows of cars", "lines of cars")),
    "tank": Noun(("storage tank", "oil tank", "tank"), ("storage tanks", "oil tanks", "tanks"),
                 ("stand", "are located", "are"), ("stands", "is located", "is")),
    "diamond": Noun(("baseball diamond", "diamond", "baseball field"),
                    ("baseball diamonds", "diamonds", "baseball fields"),
                    ("are", "lie", "are located"), ("is", "lies", "is located")),
    "court": Noun(("tennis court", "court"), ("tennis courts", "courts"), ("are", "lie", "are located"),
                  ("is", "lies", "is located")),
    "track": Noun(("running track", "track"), verbs_singular=("is", "lies"), single=("a", "the")),
    "pitch": Noun(("football field", "soccer field"), verbs_singular=("is", "lies"), single=("a", "the")),
    "factory": Noun(("factory", "factory building", "warehouse"), ("factories", "factory buildings", "warehouses"),
                    ("stand", "are", "are located"), ("stands", "is", "is located")),
    "house": Noun(("house", "building"), ("houses", "buildings", "residential buildings"),
                  ("stand", "are", "are built"), ("stands", "is", "is built")),
    "park": Noun(("park", "garden"), verbs_singular=("is", "lies"), single=("a",)),
    "pool": Noun(("swimming pool", "pool"), ("swimming pools", "pools")),
    "church": Noun(("church", "cathedral"), verbs_singular=("stands", "is", "is located"), single=("a",)),
}

REGION_PHRASES = {
    "top left": ("in the top left corner", "in the upper left corner", "at the top left"),
    "top right": ("in the top right corner", "in the upper right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "in the lower left corner", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "in the lower right corner", "at the bottom right"),
    "top": ("at the top", "in the upper part", "on the top side"),
    "bottom": ("at the bottom", "in the lower part", "on the bottom side"),
    "left": ("on the left", "on the left side", "in the left part"),
    "right": ("on the right", "on the right side", "in the right part"),
    "center": ("in the center", "in the middle", "in the central part"),
}
RELATION_PHRASES = {
    "next_to": ("next to the {}", "beside the {}", "near the {}", "alongside the {}"),
    "along": ("along the {}", "by the {}"),
    "on": ("on the {}",),
    "across": ("across the {}", "over the {}", "spanning the {}"),
    "around": ("around the {}", "close to the {}"),
    "inside": ("inside the {}", "within the {}"),
    "near": ("near the {}", "close to the {}", "by the {}"),
}
LANDMARK_NOUNS = {
    "runway": ("runway", "airstrip"),
    "pier": ("pier", "wharf", "dock"),
    "coast": ("coast", "shore", "coastline"),
    "river": ("river",),
    "bridge": ("bridge",),
    "pond": ("pond", "water"),
    "track": ("track", "running track"),
    "road": ("road", "street"),
    "church": ("church",),
}
ORIENTATION_PHRASES = {
    "horizontal": ("from left to right", "from right to left", "horizontally"),
    "vertical": ("from top to bottom", "from bottom to top", "vertically"),
}
_VAGUE_QUANTIFIERS = (  # (min count, max count or None, words)
    (2, 2, ("a couple of",)),
    (2, None, ("some",)),
    (3, 5, ("a few",)),
    (3, 9, ("several",)),
    (5, None, ("many",)),
    (7, None, ("lots of", "a lot of", "numerous")),
    (12, None, ("a large number of",)),
    (24, None, ("dozens of",)),
)


@dataclasses.dataclass(frozen=True)
class _Location:
  """A phrase locating a group, in the forms the sentence templates need."""

  after_verb: str  # "is parked" + after_verb: "next to the runway"
  joiner: str  # after_verb + joiner + "the airport": "in" / "of" / "through"
  after_noun: str  # "an airport with three planes" + after_noun
  there_ok: bool  # usable in "there are ... <after_verb>"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _is_plural(group: ObjectGroup) -> bool:
  return group.count is not None and group.count > 1


def _quantity(count: int | None, noun: Noun, rng: np.random.Generator) -> str:
  """A determiner true of `count`: exact number words up to six, else vague ones."""
  if count is None:
    return ""
  if count == 1:
    return _pick(rng, noun.single)
  if count < len(NUMBER_WORDS) and rng.random() < 0.8:
    return NUMBER_WORDS[count]
  return _pick(rng, [word for low, high, words in _VAGUE_QUANTIFIERS
                     if low <= count and (high is None or count <= high) for word in words])


def _noun_phrase(group: ObjectGroup, rng: np.random.Generator, *, colour_required: bool) -> str:
  noun = NOUNS[group.kind]
  words = [_quantity(group.count, noun, rng)]
  if group.size and rng.random() < 0.5:
    words.append(_pick(rng, SIZE_WORDS[group.size]))
  if group.colour and (colour_required or rng.random() < 0.75):
    words.append(_pick(rng, COLOUR_WORDS[group.colour]))
  words.append(_pick(rng, noun.plural if _is_plural(group) else noun.singular))
  return " ".join(word for word in words if word)


def _verb(group: ObjectGroup, rng: np.random.Generator) -> str:
  noun = NOUNS[group.kind]
  return _pick(rng, noun.verbs if _is_plural(group) else noun.verbs_singular)


def _location(group: ObjectGroup, rng: np.random.Generator) -> _Location | None:
  """Picks one of the relation, region and orientation the group has, if any."""
  options = []
  if group.relation is not None:
    relation, landmark = group.relation
    phrase = _pick(rng, RELATION_PHRASES[relation]).format(_pick(rng, LANDMARK_NOUNS[landmark]))
    options.append(_Location(phrase, "in", phrase, there_ok=True))
  if group.region is not None:
    phrase = _pick(rng, REGION_PHRASES[group.region])
    options.append(_Location(phrase, "of", phrase, there_ok=True))
  if group.orientation is not None:
    phrase = _pick(rng, ORIENTATION_PHRASES[group.orientation])
    gerund = _pick(rng, NOUNS[group.kind].gerunds)
    options.append(_Location(phrase, _pick(rng, ("through", "in")), f"{gerund} {phrase}", there_ok=False))
  if not options:
    return None
  return options[int(rng.integers(len(options)))]


def _colour_required(group: ObjectGroup, layout: Layout) -> bool:
  """Whether other groups share the kind, e.g. cars grouped by colour: the count alone would be ambiguous."""
  return sum(g.kind == group.kind for g in layout.groups) > 1


def _one_fact(group: ObjectGroup, layout: Layout, scene: str, rng: np.random.Generator) -> str:
  """A sentence about one group, e.g. "two white planes are parked next to the runway in the airport"."""
  noun_phrase = _noun_phrase(group, rng, colour_required=_colour_required(group, layout))
  there = "there are" if _is_plural(group) else "there is"
  location = _location(group, rng) if rng.random() < 0.8 else None
  if location is None:
    templates = [f"{noun_phrase} {_verb(group, rng)} in the {scene}", f"a {scene} with {noun_phrase}"]
    if not noun_phrase.startswith("the "):
      templates.append(f"{there} {noun_phrase} in this {scene}")
  else:
    templates = [f"{noun_phrase} {_verb(group, rng)} {location.after_verb} {location.joiner} the {scene}",
                 f"a {scene} with {noun_phrase} {location.after_noun}"]
    if location.there_ok and not noun_phrase.startswith("the "):
      templates.append(f"{there} {noun_phrase} {location.after_verb} {location.joiner} this {scene}")
  return _pick(rng, templates)


def _two_facts(first: ObjectGroup, second: ObjectGroup, layout: Layout, scene: str,
               rng: np.random.Generator) -> str:
  """A sentence naming two groups, e.g. "a port with four red ships and the blue sea"."""
  phrases = [_noun_phrase(g, rng, colour_required=_colour_required(g, layout)) for g in (first, second)]
  both = " and ".join(phrases)
  there = "there are" if _is_plural(first) else "there is"
  templates = [f"a {scene} with {both}", f"{both} can be seen in the {scene}"]
  if not both.startswith("the "):
    templates.append(f"{there} {both} in this {scene}")
  return _pick(rng, templates)


def _scene_only(layout: Layout, scene: str, rng: np.random.Generator) -> str:
  adjectives = SCENE_ADJECTIVES.get(layout.scene, ())
  described = f"{_pick(rng, adjectives)} {scene}" if adjectives and rng.random() < 0.5 else scene
  return _pick(rng, (f"a {described}", f"this is a {described}", f"it is a {described}",
                     f"an aerial image of a {described}", f"a {described} seen from above"))


def _group_weights(groups: Sequence[ObjectGroup]) -> np.ndarray:
  """Prefers groups with countable, coloured or located objects: the facts that discriminate."""
  weights = np.array([1.0 + (g.colour is not None) + (g.count is not None and 1 < g.count < len(NUMBER_WORDS))
                      + (g.region is not None or g.relation is not None) for g in groups])
  return weights / weights.sum()


def _with_articles(text: str) -> str:
  """Lowercase tokens with "a" turned into "an" before vowels, ending with " ."."""
  tokens = text.lower().split()
  for i, token in enumerate(tokens[:-1]):
    if token == "a" and tokens[i + 1][0] in "aeiou":
      tokens[i] = "an"
  return " ".join(tokens) + " ."


def _caption(layout: Layout, rng: np.random.Generator) -> str:
  """One caption: 15% scene only, 25% two facts (when possible), else one fact."""
  scene = _pick(rng, SCENE_NOUNS[layout.scene])
  groups = layout.groups
  roll = rng.random()
  if roll < 0.15 or not groups:
    return _with_articles(_scene_only(layout, scene, rng))
  if roll < 0.4 and len(groups) >= 2:
    first, second = rng.choice(len(groups), size=2, replace=False, p=_group_weights(groups))
    return _with_articles(_two_facts(groups[first], groups[second], layout, scene, rng))
  group = groups[int(rng.choice(len(groups), p=_group_weights(groups)))]
  return _with_articles(_one_fact(group, layout, scene, rng))


def make_captions(layout: Layout, rng: np.random.Generator, num: int = NUM_CAPTIONS) -> list[str]:
  """`num` captions; with REPEAT_PROBABILITY, 1..num-1 distinct ones repeated to fill the slots."""
  if rng.random() < REPEAT_PROBABILITY:
    distinct = [_caption(layout, rng) for _ in range(int(rng.integers(1, num)))]
    return [distinct[i % len(distinct)] for i in range(num)]
  return [_caption(layout, rng) for _ in range(num)]


def keywords(layout: Layout) -> list[str]:
  """The scene noun followed by the nouns of the objects shown, at most MAX_KEYWORDS."""
  words = [SCENE_NOUNS[layout.scene][0]] + [NOUNS[g.kind].singular[0] for g in layout.groups]
  return list(dict.fromkeys(words))[:MAX_KEYWORDS]
