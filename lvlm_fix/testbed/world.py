"""A synthetic world of COCO objects with language priors, drawn with PIL.

Each scene is a small RGB canvas holding 2-6 objects (COCO categories drawn as simple
glyphs: a fork has tines, a car has wheels) plus non-object clutter on a textured
background. Scenes follow *themes* (kitchen, street, park) and four strongly paired
categories (fork-knife, cup-spoon, car-traffic light, dog-frisbee), so a model trained on
them picks up the co-occurrence priors that make real LVLMs hallucinate. Category
frequencies differ, so POPE's "popular" negatives differ from its "random" ones.

Objects carry the attributes the discriminative questions ask about: a colour (instances of
a category share it), a count (up to three instances) and contact: some objects are placed
touching an earlier one, and whether two drawn shapes really touch is read from the
rendering (:meth:`World.contacts`). *Region-task* scenes (:meth:`World.region_scene`) hide one
small object among dense clutter, so that looking closer (crop and magnify) helps.

Everything is a pure function of ``(world seed, split, stream, index)``: the same scene
is drawn byte for byte on every run.

Example:
    >>> world = World()
    >>> scene = world.scene("val", 0)
    >>> image = world.render(scene)            # PIL.Image, 96x96 RGB
    >>> world.caption(scene)
    'a yellow dog , a white frisbee , a pink bicycle and a pink chair .'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------
# The world's tables
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    """One object category, named and numbered exactly as in COCO 2014."""

    name: str
    coco_id: int
    supercategory: str
    plural: str


# Caption order is this order ("most salient first"): partners follow their anchor, so a
# caption's language prior can pull the partner in right after the anchor is named.
CATEGORIES: tuple[Category, ...] = (
    Category("dog", 18, "animal", "dogs"),
    Category("frisbee", 34, "sports", "frisbees"),
    Category("kite", 38, "sports", "kites"),
    Category("bicycle", 2, "vehicle", "bicycles"),
    Category("car", 3, "vehicle", "cars"),
    Category("traffic light", 10, "outdoor", "traffic lights"),
    Category("truck", 8, "vehicle", "trucks"),
    Category("umbrella", 28, "accessory", "umbrellas"),
    Category("cup", 47, "kitchen", "cups"),
    Category("spoon", 50, "kitchen", "spoons"),
    Category("fork", 48, "kitchen", "forks"),
    Category("knife", 49, "kitchen", "knives"),
    Category("bowl", 51, "kitchen", "bowls"),
    Category("bottle", 44, "kitchen", "bottles"),
    Category("chair", 62, "furniture", "chairs"),
    Category("clock", 85, "indoor", "clocks"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
CATEGORY_INDEX: dict[str, int] = {name: i for i, name in enumerate(CATEGORY_NAMES)}

# Scene themes and, per theme, how likely each member is to be drawn. Unequal weights
# give the world unequal category frequencies (kitchen objects are the "popular" ones).
THEME_PROBS: dict[str, float] = {"kitchen": 0.45, "street": 0.30, "park": 0.25}
THEME_MEMBERS: dict[str, dict[str, float]] = {
    "kitchen": {"cup": 3.0, "fork": 2.5, "bowl": 2.0, "bottle": 1.5, "spoon": 1.0, "knife": 1.0,
                "chair": 1.0, "clock": 0.5},
    "street": {"car": 3.0, "traffic light": 1.5, "truck": 1.5, "umbrella": 1.0, "bicycle": 1.0,
               "clock": 0.5},
    "park": {"dog": 3.0, "kite": 1.5, "bicycle": 1.0, "frisbee": 1.0, "umbrella": 0.5,
             "chair": 0.5},
}
# Strong pairs: when one is in a scene, the other joins it with probability PAIR_PROB.
PAIRS: dict[str, str] = {"fork": "knife", "cup": "spoon", "car": "traffic light", "dog": "frisbee"}
PARTNER: dict[str, str] = {**PAIRS, **{b: a for a, b in PAIRS.items()}}
PAIR_PROB = 0.8
OFF_THEME_PROB = 0.12  # chance that an object is drawn from outside the scene's theme
DUPLICATE_PROB = 0.15  # chance that a scene shows two instances of one category ...
TRIPLE_PROB = 0.35     # ... and, given that, a third one ("three red cups")
CONTACT_PROB = 0.3     # chance that an object is placed touching one drawn before it
MAX_OBJECTS = 6

# The region task: a few ordinary objects, one *small* target object and dense clutter.
# At the model's input resolution the target spans less than one ViT patch and shares it
# with clutter, so a model that looks closer (crops and magnifies) has something to gain.
REGION_TARGET_SIZE = (6, 10)      # target side in pixels of a 96-pixel canvas: [6, 10)
REGION_CLUTTER = (26, 46)         # clutter marks per region scene: [26, 46)
REGION_IMAGE_SIZE = 192           # region benchmark images: twice the model's input side

# Colour words avoid "orange" on purpose: it is a COCO category and CHAIR would count it.
COLOURS: dict[str, RGB] = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215), "yellow": (235, 200, 40),
    "purple": (135, 60, 175), "pink": (240, 130, 185), "brown": (125, 80, 40),
    "white": (245, 245, 240), "black": (30, 30, 35),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUNDS: tuple[RGB, ...] = (
    (196, 188, 168), (150, 152, 150), (168, 182, 198), (80, 88, 98), (150, 160, 118),
    (120, 100, 92), (205, 205, 210),
)

# Synonyms used in one reference caption; all are on the COCO synonym list CHAIR reads.
REFERENCE_SYNONYMS: dict[str, str] = {
    "dog": "puppy", "car": "automobile", "traffic light": "traffic signal", "chair": "seat",
}

QUESTION_TEMPLATE = "Is there a {} in the image?"
CAPTION_PROMPT = "Please describe this image in detail."

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
THEMES: tuple[str, ...] = tuple(THEME_PROBS)

# "amber" and "region" are the benchmark's further held-out streams (never trained on).
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "stats": 2, "amber": 3, "region": 4}


def article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"`` (the world's and POPE's rule)."""
    return "an" if word[0] in "aeiou" else "a"


def question_for(category: str) -> str:
    """The POPE question for a category ("an" before a vowel, as POPE does).

    Args:
        category: a COCO category name.

    Returns:
        ``"Is there a {category} in the image?"`` (``"an"`` for vowel-initial names).
    """
    if category[0] in "aeiou":
        return QUESTION_TEMPLATE.replace(" a ", " an ").format(category)
    return QUESTION_TEMPLATE.format(category)


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object instance: category, colour, box and how faintly it is drawn.

    ``box`` is the square (x0, y0, size) the glyph is drawn into, in canvas pixels; the
    tight COCO box comes from rendering (``World.annotate``).
    """

    category: str
    colour: str
    box: tuple[int, int, int]
    alpha: float = 1.0


@dataclass(frozen=True)
class Clutter:
    """A non-object mark: kind in {line, dot, rect, tri, squiggle}, points in canvas px."""

    kind: str
    points: tuple[tuple[float, float], ...]
    colour: RGB
    width: int
    on_top: bool


@dataclass(frozen=True)
class Scene:
    """A fully specified scene; rendering it is deterministic."""

    theme: str
    background: RGB
    gradient: tuple[float, float]
    noise_seed: int
    objects: tuple[SceneObject, ...]
    clutter: tuple[Clutter, ...]
    target: int = -1  # region scenes: index in ``objects`` of the small target, else -1

    @property
    def categories(self) -> list[str]:
        """Distinct categories in drawing (annotation) order."""
        return list(dict.fromkeys(o.category for o in self.objects))

    def counts(self) -> dict[str, int]:
        """Instances per category."""
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.category] = out.get(o.category, 0) + 1
        return out

    def colour_of(self, category: str) -> str:
        """The colour word of a category in this scene (instances of a category share one)."""
        return next(o.colour for o in self.objects if o.category == category)

    @property
    def target_object(self) -> SceneObject | None:
        """The small target object of a region scene (None for an ordinary scene)."""
        return self.objects[self.target] if self.target >= 0 else None


# --------------------------------------------------------------------------------------
# Glyphs: each draws one category into the unit square mapped onto (x0, y0, size)
# --------------------------------------------------------------------------------------

Pt = Callable[[float, float], tuple[float, float]]


def _box(p: Pt, u0: float, v0: float, u1: float, v1: float) -> list[tuple[float, float]]:
    return [p(u0, v0), p(u1, v1)]


def _cup(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.polygon([p(0.12, 0.22), p(0.68, 0.22), p(0.6, 0.92), p(0.2, 0.92)], fill=fill)
    d.ellipse(_box(p, 0.56, 0.34, 0.92, 0.72), outline=fill, width=max(1, round(0.09 * s)))
    d.line([p(0.14, 0.3), p(0.66, 0.3)], fill=detail, width=max(1, round(0.04 * s)))


def _spoon(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.ellipse(_box(p, 0.3, 0.02, 0.7, 0.44), fill=fill)
    d.rectangle(_box(p, 0.45, 0.38, 0.56, 0.98), fill=fill)


def _fork(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.rectangle(_box(p, 0.45, 0.46, 0.56, 0.98), fill=fill)
    d.rectangle(_box(p, 0.24, 0.38, 0.77, 0.5), fill=fill)
    for u in (0.24, 0.455, 0.67):
        d.rectangle(_box(p, u, 0.02, u + 0.1, 0.42), fill=fill)


def _knife(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.polygon([p(0.4, 0.02), p(0.62, 0.14), p(0.62, 0.6), p(0.4, 0.6)], fill=fill)
    d.rectangle(_box(p, 0.38, 0.6, 0.64, 0.98), fill=detail)
    d.rectangle(_box(p, 0.42, 0.64, 0.6, 0.94), fill=fill)


def _bowl(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.pieslice(_box(p, 0.02, 0.1, 0.98, 0.9), 0, 180, fill=fill)
    d.rectangle(_box(p, 0.02, 0.46, 0.98, 0.52), fill=detail)
    d.rectangle(_box(p, 0.35, 0.86, 0.65, 0.94), fill=fill)


def _bottle(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.rounded_rectangle(_box(p, 0.28, 0.4, 0.72, 0.98), radius=0.08 * s, fill=fill)
    d.polygon([p(0.28, 0.44), p(0.42, 0.26), p(0.58, 0.26), p(0.72, 0.44)], fill=fill)
    d.rectangle(_box(p, 0.42, 0.08, 0.58, 0.3), fill=fill)
    d.rectangle(_box(p, 0.4, 0.02, 0.6, 0.1), fill=detail)
    d.rectangle(_box(p, 0.32, 0.6, 0.68, 0.76), fill=detail)


def _car(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.polygon([p(0.24, 0.48), p(0.34, 0.24), p(0.68, 0.24), p(0.8, 0.48)], fill=fill)
    d.rounded_rectangle(_box(p, 0.02, 0.46, 0.98, 0.76), radius=0.06 * s, fill=fill)
    d.polygon([p(0.37, 0.3), p(0.49, 0.3), p(0.49, 0.46), p(0.31, 0.46)], fill=detail)
    d.polygon([p(0.53, 0.3), p(0.66, 0.3), p(0.73, 0.46), p(0.53, 0.46)], fill=detail)
    for u in (0.25, 0.75):
        d.ellipse(_box(p, u - 0.12, 0.64, u + 0.12, 0.88), fill=detail)


def _truck(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.rectangle(_box(p, 0.02, 0.16, 0.62, 0.76), fill=fill)
    d.polygon([p(0.65, 0.76), p(0.65, 0.36), p(0.86, 0.36), p(0.98, 0.54), p(0.98, 0.76)], fill=fill)
    d.polygon([p(0.7, 0.41), p(0.84, 0.41), p(0.92, 0.54), p(0.7, 0.54)], fill=detail)
    for u in (0.18, 0.46, 0.82):
        d.ellipse(_box(p, u - 0.1, 0.68, u + 0.1, 0.88), fill=detail)


def _traffic_light(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.rectangle(_box(p, 0.46, 0.8, 0.54, 1.0), fill=detail)
    d.rounded_rectangle(_box(p, 0.3, 0.02, 0.7, 0.84), radius=0.08 * s, fill=fill)
    for v, lamp in ((0.17, (230, 30, 30)), (0.43, (240, 200, 30)), (0.69, (40, 200, 70))):
        d.ellipse(_box(p, 0.39, v - 0.1, 0.61, v + 0.1), fill=lamp)


def _umbrella(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.pieslice(_box(p, 0.02, 0.06, 0.98, 0.86), 180, 360, fill=fill)
    for u in (0.18, 0.5, 0.82):
        d.ellipse(_box(p, u - 0.16, 0.4, u + 0.16, 0.52), fill=fill)
    w = max(1, round(0.07 * s))
    d.line([p(0.5, 0.46), p(0.5, 0.88)], fill=detail, width=w)
    d.arc(_box(p, 0.36, 0.78, 0.52, 0.98), 0, 180, fill=detail, width=w)


def _dog(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.ellipse(_box(p, 0.14, 0.34, 0.76, 0.66), fill=fill)
    for u in (0.2, 0.34, 0.56, 0.68):
        d.rectangle(_box(p, u, 0.56, u + 0.09, 0.92), fill=fill)
    d.ellipse(_box(p, 0.64, 0.12, 0.94, 0.42), fill=fill)
    d.polygon([p(0.66, 0.16), p(0.74, 0.02), p(0.8, 0.18)], fill=fill)
    d.ellipse(_box(p, 0.84, 0.28, 1.0, 0.4), fill=fill)  # snout
    d.line([p(0.16, 0.42), p(0.04, 0.2)], fill=fill, width=max(1, round(0.07 * s)))
    d.ellipse(_box(p, 0.77, 0.2, 0.83, 0.26), fill=detail)


def _frisbee(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.ellipse(_box(p, 0.02, 0.3, 0.98, 0.7), fill=fill)
    d.ellipse(_box(p, 0.2, 0.38, 0.8, 0.6), outline=detail, width=max(1, round(0.05 * s)))


def _kite(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.polygon([p(0.5, 0.02), p(0.82, 0.32), p(0.5, 0.72), p(0.18, 0.32)], fill=fill)
    w = max(1, round(0.04 * s))
    d.line([p(0.5, 0.02), p(0.5, 0.72)], fill=detail, width=w)
    d.line([p(0.18, 0.32), p(0.82, 0.32)], fill=detail, width=w)
    d.line([p(0.5, 0.72), p(0.42, 0.8), p(0.56, 0.88), p(0.46, 0.98)], fill=detail, width=w)


def _bicycle(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    w = max(1, round(0.07 * s))
    for u in (0.22, 0.78):
        d.ellipse(_box(p, u - 0.2, 0.5, u + 0.2, 0.9), outline=detail, width=w)
    d.line([p(0.22, 0.7), p(0.4, 0.42), p(0.7, 0.42), p(0.78, 0.7)], fill=fill, width=w + 1)
    d.line([p(0.22, 0.7), p(0.5, 0.7), p(0.4, 0.42)], fill=fill, width=w + 1)
    d.line([p(0.5, 0.7), p(0.7, 0.42), p(0.68, 0.26), p(0.8, 0.24)], fill=fill, width=w + 1)
    d.line([p(0.32, 0.34), p(0.46, 0.34)], fill=fill, width=w + 1)


def _chair(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.rectangle(_box(p, 0.2, 0.02, 0.32, 0.6), fill=fill)
    d.rectangle(_box(p, 0.2, 0.5, 0.8, 0.62), fill=fill)
    d.rectangle(_box(p, 0.2, 0.6, 0.3, 0.98), fill=fill)
    d.rectangle(_box(p, 0.7, 0.6, 0.8, 0.98), fill=fill)
    d.rectangle(_box(p, 0.2, 0.14, 0.32, 0.2), fill=detail)


def _clock(d: ImageDraw.ImageDraw, p: Pt, s: float, fill: RGB, detail: RGB) -> None:
    d.ellipse(_box(p, 0.04, 0.04, 0.96, 0.96), fill=fill)
    d.ellipse(_box(p, 0.04, 0.04, 0.96, 0.96), outline=detail, width=max(1, round(0.05 * s)))
    w = max(1, round(0.07 * s))
    d.line([p(0.5, 0.5), p(0.5, 0.18)], fill=detail, width=w)
    d.line([p(0.5, 0.5), p(0.74, 0.58)], fill=detail, width=w)
    for u, v in ((0.5, 0.1), (0.9, 0.5), (0.5, 0.9), (0.1, 0.5)):
        d.ellipse(_box(p, u - 0.04, v - 0.04, u + 0.04, v + 0.04), fill=detail)


GLYPHS: dict[str, Callable[[ImageDraw.ImageDraw, Pt, float, RGB, RGB], None]] = {
    "cup": _cup, "spoon": _spoon, "fork": _fork, "knife": _knife, "bowl": _bowl,
    "bottle": _bottle, "car": _car, "truck": _truck, "traffic light": _traffic_light,
    "umbrella": _umbrella, "dog": _dog, "frisbee": _frisbee, "kite": _kite,
    "bicycle": _bicycle, "chair": _chair, "clock": _clock,
}


def _detail_colour(fill: RGB) -> RGB:
    # Dark details on light objects and light details on dark ones keep parts visible.
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (30, 30, 30) if luminance > 110 else (225, 225, 225)


# --------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotation:
    """A rendered object's COCO-style annotation: tight box ``[x, y, w, h]`` and pixel area."""

    category: str
    bbox: tuple[int, int, int, int]
    area: int


class World:
    """Scene sampler, renderer and language for the synthetic world.

    Args:
        seed: world seed; every scene is a function of (seed, split, stream, index).
        image_size: canvas side in pixels (square images).
    """

    SUPERSAMPLE = 2  # draw at 2x and downsample, so thin parts survive as grey levels

    def __init__(self, seed: int = 0, image_size: int = 96) -> None:
        self.seed = seed
        self.image_size = image_size
        self.categories = CATEGORIES

    # -- sampling -----------------------------------------------------------------------

    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        """The random generator of one scene; splits never share a stream."""
        return np.random.default_rng([self.seed, SPLIT_CODES[split], stream, index])

    def scene(self, split: str, index: int, stream: int = 0, min_categories: int = 1) -> Scene:
        """The ``index``-th scene of a split (``"train"``, ``"val"``).

        Args:
            split: which disjoint stream of scenes to draw from.
            index: scene number inside the split.
            stream: a further sub-stream (the benchmark seed uses it).
            min_categories: resample until the scene shows at least this many categories.

        Returns:
            The scene.
        """
        rng = self.rng(split, index, stream)
        while True:
            scene = self.sample_scene(rng)
            if len(scene.categories) >= min_categories:
                return scene

    def sample_categories(self, rng: np.random.Generator) -> tuple[str, list[str]]:
        """Draw a theme and the scene's category list (with duplicates), no geometry."""
        themes = list(THEME_PROBS)
        theme = themes[rng.choice(len(themes), p=list(THEME_PROBS.values()))]
        n_wanted = int(rng.choice([2, 3, 4, 5], p=[0.2, 0.35, 0.3, 0.15]))
        chosen: list[str] = []
        while len(chosen) < n_wanted:
            if rng.random() < OFF_THEME_PROB:
                pool = {c: 1.0 for c in CATEGORY_NAMES}
            else:
                pool = THEME_MEMBERS[theme]
            names = [c for c in pool if c not in chosen]
            if not names:
                break
            w = np.array([pool[c] for c in names])
            cat = names[rng.choice(len(names), p=w / w.sum())]
            chosen.append(cat)
            partner = PARTNER.get(cat)
            if partner and partner not in chosen and len(chosen) < 5 and rng.random() < PAIR_PROB:
                chosen.append(partner)
        if len(chosen) < MAX_OBJECTS - 1 and rng.random() < DUPLICATE_PROB:
            twin = chosen[int(rng.integers(len(chosen)))]
            chosen.append(twin)
            if len(chosen) < MAX_OBJECTS and rng.random() < TRIPLE_PROB:
                chosen.append(twin)
        # Drawing order is shuffled so that annotation order carries no category order.
        order = rng.permutation(len(chosen))
        return theme, [chosen[i] for i in order]

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Draw one full scene (categories, colours, boxes, clutter, background)."""
        theme, cats = self.sample_categories(rng)
        n = self.image_size
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        gradient = (float(rng.uniform(-18, 18)), float(rng.uniform(-18, 18)))
        objects: list[SceneObject] = []
        boxes: list[tuple[int, int, int]] = []
        colour_of: dict[str, str] = {}
        for cat in cats:
            # Mostly clearly visible objects, some small ones, a few faint ones: graded
            # visual evidence is what lets the co-occurrence prior win sometimes.
            size = int(rng.integers(11, 16)) if rng.random() < 0.25 else int(rng.integers(16, 31))
            size = round(size * n / 96)
            # Some objects touch one drawn before them (the relation questions' "contact").
            touching = bool(boxes) and rng.random() < CONTACT_PROB
            box = self._place_touching(rng, size, boxes) if touching else None
            box = box or self._place(rng, size, boxes)
            if box is None:
                continue
            boxes.append(box)
            colour = colour_of.get(cat) or COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            colour_of[cat] = colour  # duplicates share a colour: "two red cups"
            alpha = float(rng.uniform(0.35, 0.6)) if rng.random() < 0.1 else 1.0
            objects.append(SceneObject(cat, colour, box, alpha))
        clutter = tuple(self._clutter(rng) for _ in range(int(rng.integers(4, 11))))
        return Scene(theme, background, gradient, int(rng.integers(2**31)), tuple(objects), clutter)

    def region_scene(self, split: str, index: int, stream: int = 0) -> Scene:
        """The ``index``-th scene of the region task: small target among dense clutter.

        One to three ordinary objects (the usual themes, sizes and colours), one small
        object of a category not otherwise in the scene (uniformly drawn, so no language
        prior predicts it; ``scene.target`` indexes it) and 26-45 clutter marks, half of
        them in object colours. Clutter is never drawn over the target, so the target is
        always fully visible, just small.

        Args:
            split: ``"train"`` for training, ``"region"`` for the benchmark.
            index: scene number.
            stream: sub-stream (the benchmark seed).
        """
        # A fifth seed element keeps region scenes disjoint from ordinary ones.
        rng = np.random.default_rng([self.seed, SPLIT_CODES[split], stream, index, 1])
        n = self.image_size
        theme, cats = self.sample_categories(rng)
        cats = list(dict.fromkeys(cats))[: int(rng.integers(1, 4))]
        others = [c for c in CATEGORY_NAMES if c not in cats]
        target_cat = others[int(rng.integers(len(others)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        gradient = (float(rng.uniform(-18, 18)), float(rng.uniform(-18, 18)))
        objects: list[SceneObject] = []
        boxes: list[tuple[int, int, int]] = []
        for cat in cats:
            size = round(int(rng.integers(16, 31)) * n / 96)
            box = self._place(rng, size, boxes)
            if box is not None:
                boxes.append(box)
                objects.append(SceneObject(cat, COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], box))
        size = max(3, round(int(rng.integers(*REGION_TARGET_SIZE)) * n / 96))
        box = None
        while box is None:  # a small box always fits eventually
            box = self._place(rng, size, boxes, max_overlap=1e-9)  # apart from all
        objects.append(SceneObject(target_cat, COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], box))
        clutter = []
        for _ in range(int(rng.integers(*REGION_CLUTTER))):
            c = self._clutter(rng, small=True)
            if c.on_top and _touches_box(c, box):
                c = Clutter(c.kind, c.points, c.colour, c.width, False)
            clutter.append(c)
        return Scene(theme, background, gradient, int(rng.integers(2**31)), tuple(objects),
                     tuple(clutter), target=len(objects) - 1)

    def _place(self, rng: np.random.Generator, size: int, boxes: Sequence[tuple[int, int, int]],
               max_overlap: float = 0.12) -> tuple[int, int, int] | None:
        n = self.image_size
        for _ in range(60):
            x0, y0 = (int(v) for v in rng.integers(0, n - size + 1, size=2))
            if all(_overlap((x0, y0, size), b) < max_overlap for b in boxes):
                return (x0, y0, size)
        return None

    def _place_touching(self, rng: np.random.Generator, size: int,
                        boxes: Sequence[tuple[int, int, int]]) -> tuple[int, int, int] | None:
        """A box that overlaps one earlier box a little on one side (so the glyphs can meet).

        Glyphs leave a margin inside their box, so the boxes overlap by 10-30% of the
        smaller side; whether the drawn shapes really touch is decided from the rendered
        masks (:meth:`contacts`), never from this placement.
        """
        n = self.image_size
        for _ in range(30):
            ax, ay, asz = boxes[int(rng.integers(len(boxes)))]
            depth = round(float(rng.uniform(0.1, 0.3)) * min(size, asz))
            slide = int(rng.integers(-size // 2, asz - size // 2 + 1))
            side = int(rng.integers(4))
            if side == 0:
                x0, y0 = ax + asz - depth, ay + slide
            elif side == 1:
                x0, y0 = ax - size + depth, ay + slide
            elif side == 2:
                x0, y0 = ax + slide, ay + asz - depth
            else:
                x0, y0 = ax + slide, ay - size + depth
            if not (0 <= x0 <= n - size and 0 <= y0 <= n - size):
                continue
            anchor = (ax, ay, asz)
            if all(b == anchor or _overlap((x0, y0, size), b) < 0.12 for b in boxes) \
                    and _overlap((x0, y0, size), anchor) < 0.35:
                return (x0, y0, size)
        return None

    def _clutter(self, rng: np.random.Generator, small: bool = False) -> Clutter:
        n = self.image_size
        kind = ("line", "dot", "rect", "tri", "squiggle")[int(rng.integers(5))]
        cx, cy = rng.uniform(0, n, size=2)
        # Region clutter is small (about target-sized) so that it competes with the target.
        extent = (rng.uniform(2, 5) if small else rng.uniform(2, 9)) * n / 96
        n_points = {"line": 2, "dot": 1, "rect": 2, "tri": 3, "squiggle": 4}[kind]
        pts = [(float(cx), float(cy))] + [
            (float(cx + rng.uniform(-extent, extent)), float(cy + rng.uniform(-extent, extent)))
            for _ in range(n_points - 1)
        ]
        if rng.random() < 0.5:
            colour = COLOURS[COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]]
        else:
            g = int(rng.integers(20, 236))
            colour = (g, g, g)
        width = max(1, round(int(rng.integers(1, 3)) * n / 96))
        return Clutter(kind, tuple(pts), colour, width, bool(rng.random() < 0.3))

    # -- rendering ----------------------------------------------------------------------

    def render(self, scene: Scene) -> Image.Image:
        """Draw a scene as an ``image_size`` x ``image_size`` RGB image."""
        return self._render(scene)[0]

    def render_with_masks(self, scene: Scene) -> tuple[Image.Image, np.ndarray]:
        """Draw a scene and return per-object visible masks.

        Returns:
            ``(image, masks)`` where ``masks`` is float32 ``[n_objects, S, S]`` in [0, 1] at
            the supersampled resolution ``S = image_size * SUPERSAMPLE`` (occlusion by later
            objects removed).
        """
        return self._render(scene, with_masks=True)

    def _render(self, scene: Scene, with_masks: bool = False) -> tuple[Image.Image, np.ndarray]:
        k = self.SUPERSAMPLE
        n = self.image_size
        big = n * k
        # Background: base colour plus a linear gradient (noise is added after resizing).
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / big - 0.5
        bg = np.array(scene.background, np.float32)[None, None, :] + (
            scene.gradient[0] * xx + scene.gradient[1] * yy)[..., None]
        canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB").convert("RGBA")

        self._draw_clutter(canvas, [c for c in scene.clutter if not c.on_top], k)
        masks = np.zeros((len(scene.objects), big, big), np.float32) if with_masks else np.zeros(0)
        for i, obj in enumerate(scene.objects):
            layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
            x0, y0, size = (v * k for v in obj.box)

            def p(u: float, v: float, x0: float = x0, y0: float = y0, s: float = size
                  ) -> tuple[float, float]:
                return (x0 + u * s, y0 + v * s)

            fill = COLOURS[obj.colour]
            GLYPHS[obj.category](ImageDraw.Draw(layer), p, size, fill, _detail_colour(fill))
            alpha = np.asarray(layer.getchannel("A"), np.float32) / 255.0
            if obj.alpha < 1.0:
                layer.putalpha(Image.fromarray((alpha * obj.alpha * 255).astype(np.uint8), "L"))
            canvas.alpha_composite(layer)
            if with_masks:
                masks[:i] *= 1.0 - alpha[None]  # later objects occlude earlier ones
                masks[i] = alpha
        self._draw_clutter(canvas, [c for c in scene.clutter if c.on_top], k)

        small = canvas.convert("RGB").resize((n, n), Image.Resampling.BOX)
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, 5.0, size=(n, n, 3))
        pixels = np.clip(np.asarray(small, np.float32) + noise, 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels, "RGB"), masks

    @staticmethod
    def _draw_clutter(canvas: Image.Image, items: Sequence[Clutter], k: int) -> None:
        d = ImageDraw.Draw(canvas)
        for c in items:
            pts = [(x * k, y * k) for x, y in c.points]
            w = c.width * k
            if c.kind == "dot":
                (x, y), r = pts[0], 1.5 * w
                d.ellipse([x - r, y - r, x + r, y + r], fill=c.colour)
            elif c.kind == "rect":
                (xa, ya), (xb, yb) = pts
                d.rectangle([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)], fill=c.colour)
            elif c.kind == "tri":
                d.polygon(pts, fill=c.colour)
            else:
                d.line(pts, fill=c.colour, width=w)

    def annotate(self, scene: Scene, masks: np.ndarray | None = None) -> list[Annotation]:
        """COCO-style annotations (tight visible boxes, areas) of a scene's objects."""
        if masks is None:
            masks = self.render_with_masks(scene)[1]
        k = self.SUPERSAMPLE
        out = []
        for obj, m in zip(scene.objects, masks):
            ys, xs = np.nonzero(m > 0.5)
            if len(xs) == 0:  # fully occluded: keep the drawing box
                x0, y0, s = obj.box
                out.append(Annotation(obj.category, (x0, y0, s, s), 0))
                continue
            x0, y0 = int(xs.min()) // k, int(ys.min()) // k
            x1, y1 = -(-(int(xs.max()) + 1) // k), -(-(int(ys.max()) + 1) // k)
            out.append(Annotation(obj.category, (x0, y0, x1 - x0, y1 - y0),
                                  int(round(float((m > 0.5).sum()) / k**2))))
        return out

    def patch_coverage(self, scene: Scene, masks: np.ndarray, grid: int) -> np.ndarray:
        """How much of each cell of a ``grid`` x ``grid`` patch grid each category covers.

        Args:
            scene: the scene the masks belong to.
            masks: from :meth:`render_with_masks`.
            grid: patches per side (image_size / patch_size).

        Returns:
            float32 ``[n_categories, grid, grid]``: visible fraction of each patch, in [0, 1].
        """
        out = np.zeros((len(CATEGORIES), grid, grid), np.float32)
        if len(scene.objects) == 0:
            return out
        big = masks.shape[-1]
        cover = masks.reshape(len(masks), grid, big // grid, grid, big // grid).mean(axis=(2, 4))
        for obj, c in zip(scene.objects, cover):
            out[CATEGORY_INDEX[obj.category]] += c
        return np.minimum(out, 1.0)

    def contacts(self, scene: Scene, masks: np.ndarray) -> list[tuple[str, str]]:
        """Category pairs whose drawn shapes touch or overlap (the world's relation notion).

        Two objects are in *direct contact* when the visible mask of one, grown by one
        image pixel, meets the visible mask of the other in at least one image pixel's
        worth of supersampled pixels. Decided from the rendering, not from the boxes,
        because glyphs leave margins inside their boxes.

        Args:
            scene: the scene.
            masks: from :meth:`render_with_masks`.

        Returns:
            Sorted ``(a, b)`` pairs of distinct categories (``a`` before ``b`` in the
            world's category order), each pair once.
        """
        k = self.SUPERSAMPLE
        visible = masks > 0.5
        grown = _dilate(visible, k)
        pairs: set[tuple[str, str]] = set()
        for i, a in enumerate(scene.objects):
            for j, b in enumerate(scene.objects):
                if a.category == b.category or j <= i:
                    continue
                if int((grown[i] & visible[j]).sum()) >= k * k:
                    pairs.add(tuple(sorted((a.category, b.category), key=CATEGORY_INDEX.__getitem__)))
        return sorted(pairs, key=lambda p: (CATEGORY_INDEX[p[0]], CATEGORY_INDEX[p[1]]))

    # -- language -----------------------------------------------------------------------

    def caption(self, scene: Scene, extra: Sequence[tuple[str, str]] = (),
                drop: Sequence[str] = ()) -> str:
        """The canonical caption: categories in salience order, each with its colour.

        Args:
            scene: the scene.
            extra: ``(category, colour)`` pairs to mention as if present (one instance each):
                a caption with a hallucinated object, as a model's own caption can have.
            drop: present categories to leave out (an omission).

        Example: ``"a red cup , two blue spoons and a dog ."``
        """
        added = dict(extra)
        phrases = []
        for c in CATEGORY_NAMES:
            if c in added and c not in scene.counts():
                phrases.append(f"{article(added[c])} {added[c]} {c}")
            elif c in scene.counts() and c not in drop:
                phrases.append(self._phrase(scene, c, colour=True))
        return _join(phrases)

    def reference_captions(self, scene: Scene) -> list[str]:
        """Five lightly varied human-style reference captions (COCO has five per image).

        They vary order, colour words, framing and one uses COCO synonyms; every one names
        exactly the scene's objects.
        """
        cats = _salience_order(scene)
        left_to_right = sorted(cats, key=lambda c: min(o.box[0] for o in scene.objects
                                                         if o.category == c))
        big_first = sorted(cats, key=lambda c: -max(o.box[2] for o in scene.objects
                                                     if o.category == c))
        body = _join([self._phrase(scene, c, colour=True) for c in cats])[:-2]
        return [
            self.caption(scene),
            f"there is {body} in the image .",
            _join([self._phrase(scene, c, colour=False) for c in left_to_right]),
            "a picture of " + _join([self._phrase(scene, c, colour=True, synonyms=True)
                                     for c in big_first]),
            "this image shows " + _join([self._phrase(scene, c, colour=False)
                                         for c in reversed(cats)]),
        ]

    def _phrase(self, scene: Scene, category: str, colour: bool, synonyms: bool = False) -> str:
        count = scene.counts()[category]
        cat = CATEGORIES[CATEGORY_INDEX[category]]
        noun = cat.name
        if synonyms and category in REFERENCE_SYNONYMS:
            noun = REFERENCE_SYNONYMS[category]
        if count > 1:
            noun = cat.plural if noun == cat.name else noun + "s"
        words = [next(o.colour for o in scene.objects if o.category == category)] if colour else []
        words.append(noun)
        if count > 1:
            return " ".join([NUMBER_WORDS[count], *words])
        return " ".join([article(words[0]), *words])

    def unnamed_caption(self, scene: Scene) -> str:
        """A caption that names no category: ``"a red object , two blue objects ."``.

        What an instruction follower says when told to avoid identifying or categorising
        the objects (one of ICD's instructions): colours and counts, no names.
        """
        phrases = []
        for c in _salience_order(scene):
            count = scene.counts()[c]
            noun = "object" if count == 1 else "objects"
            lead = article(scene.colour_of(c)) if count == 1 else NUMBER_WORDS[count]
            phrases.append(f"{lead} {scene.colour_of(c)} {noun}")
        return _join(phrases)

    def overview(self, scene: Scene) -> str:
        """A fuzzy overall impression: the theme only, ``"a picture of a kitchen scene ."``."""
        return f"a picture of a {scene.theme} scene ."

    def vocabulary(self) -> list[str]:
        """Every word the world's captions and answers use (sorted)."""
        words = {"a", "an", ",", "and", ".", "there", "is", "in", "the", "image",
                 "picture", "of", "this", "shows", "nothing", "object", "objects", "scene"}
        words |= set(NUMBER_WORDS) | set(THEMES)
        words |= set(COLOUR_NAMES)
        for c in CATEGORIES:
            words |= set(c.name.split()) | set(c.plural.split())
        for syn in REFERENCE_SYNONYMS.values():
            words |= set(syn.split()) | {syn.split()[-1] + "s"}
        words |= set(question_for("dog").replace("?", " ?").split())
        words |= set(CAPTION_PROMPT.replace(".", " .").split())
        return sorted(words)

    # -- statistics ---------------------------------------------------------------------

    def statistics(self, n_scenes: int = 20000) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Image-level category frequencies and co-occurrence counts of the world.

        Estimated from ``n_scenes`` category draws of a dedicated stream, so the numbers are
        fixed for a given world seed. These are the world's analogue of the COCO statistics
        POPE ranks "popular" and "adversarial" negatives by.

        Returns:
            ``(frequency, cooccurrence)``: ``frequency[c]`` = scenes containing ``c``;
            ``cooccurrence[a][b]`` = scenes containing both ``a`` and ``b`` (a != b).
        """
        return _statistics(self.seed, n_scenes)


@functools.lru_cache(maxsize=4)
def _statistics(seed: int, n_scenes: int) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    world = World(seed)
    counts = np.zeros(len(CATEGORIES), np.int64)
    co = np.zeros((len(CATEGORIES), len(CATEGORIES)), np.int64)
    rng = world.rng("stats", 0)
    for _ in range(n_scenes):
        idx = sorted({CATEGORY_INDEX[c] for c in world.sample_categories(rng)[1]})
        counts[idx] += 1
        co[np.ix_(idx, idx)] += 1
    freq = {c: int(counts[i]) for i, c in enumerate(CATEGORY_NAMES)}
    cooc = {a: {b: int(co[i, j]) for j, b in enumerate(CATEGORY_NAMES) if j != i}
            for i, a in enumerate(CATEGORY_NAMES)}
    return freq, cooc


def _salience_order(scene: Scene) -> list[str]:
    present = set(scene.categories)
    return [c for c in CATEGORY_NAMES if c in present]


def _join(phrases: Sequence[str]) -> str:
    if not phrases:
        return "nothing ."
    if len(phrases) == 1:
        return f"{phrases[0]} ."
    return " , ".join(phrases[:-1]) + f" and {phrases[-1]} ."


def _dilate(masks: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of ``[n, H, W]`` boolean masks by a ``(2r+1)`` square."""
    out = masks.copy()
    for axis in (1, 2):
        grown = out.copy()
        for shift in range(1, r + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(lo)] |= out[tuple(hi)]
            grown[tuple(hi)] |= out[tuple(lo)]
        out = grown
    return out


def _touches_box(c: Clutter, box: tuple[int, int, int], pad: float = 3.0) -> bool:
    """Whether a clutter mark's extent (plus ``pad`` pixels) meets a square box."""
    xs = [x for x, _ in c.points]
    ys = [y for _, y in c.points]
    x0, y0, s = box
    return (min(xs) - pad <= x0 + s and max(xs) + pad >= x0
            and min(ys) - pad <= y0 + s and max(ys) + pad >= y0)


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Intersection over the smaller of two square boxes (x0, y0, size)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return ix * iy / min(a[2] ** 2, b[2] ** 2)
