"""Procedural shape scenes with captions and a programmatic judge, for text-to-image runs.

A scene is one object at a position ("a small red circle on the left") or two objects in a
relation ("a small red circle left of a large blue square"). :func:`parse` recovers the scene
from pixels and :func:`check` tests an image against a caption, so a generator can be scored
exactly. Chosen (colour, shape) pairs never appear in training, to measure composition.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (150, 50, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "validation", "test")
HELD_OUT = frozenset({("purple", "triangle"), ("green", "circle")})

# Object side as a fraction of the image side; the gap between the ranges lets the judge tell
# sizes apart at 32 px (small 6-8 px, large 12-14 px).
_SIDE = {"small": (0.19, 0.25), "large": (0.38, 0.45)}
_SIZE_THRESHOLD = 0.31
_CENTRE_RADIUS = 0.125  # bbox centres closer than this (fraction of side) to the middle
_ANCHOR = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
_ANCHOR["centre"] = (0.5, 0.5)
_FOREGROUND = 80  # max channel above this is an object pixel; the background is black
_GAP = 2  # pixels kept free between two objects so they segment as two components

_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_RELATION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
_ONE_TEMPLATES = ("a {o} {w}", "there is a {o} {w}", "{w}, a {o}", "a picture of a {o} {w}")
_TWO_TEMPLATES = ("a {o} {r} a {p}", "there is a {o} {r} a {p}", "a picture of a {o} {r} a {p}")
_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str | None = None  # only for one-object scenes


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object with a position, or two objects with ``objects[0] <relation> objects[1]``."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    def canonical(self) -> Scene:
        """The same scene stated with "left of" or "above", so equal scenes compare equal."""
        if self.relation in ("right of", "below"):
            return Scene(self.objects[::-1], _FLIP[self.relation])
        return self


def _obj_phrase(o: Obj) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for ``scene`` from a template drawn by ``rng``."""
    if scene.relation is None:
        (o,) = scene.objects
        template = _ONE_TEMPLATES[rng.integers(len(_ONE_TEMPLATES))]
        return template.format(o=_obj_phrase(o), w=_WHERE[o.position])
    phrases = _RELATION_PHRASES[scene.relation]
    template = _TWO_TEMPLATES[rng.integers(len(_TWO_TEMPLATES))]
    a, b = scene.objects
    r = phrases[rng.integers(len(phrases))]
    return template.format(o=_obj_phrase(a), r=r, p=_obj_phrase(b))


_OBJ_RE = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_WHERE_RE = "|".join(_WHERE.values())
_REL_RE = "|".join(sorted((p for ps in _RELATION_PHRASES.values() for p in ps), key=len)[::-1])
_ONE_RES = [re.compile(t.format(o=_OBJ_RE, w=f"({_WHERE_RE})") + "$") for t in _ONE_TEMPLATES]
_TWO_RES = [
    re.compile(t.format(o=_OBJ_RE, r=f"({_REL_RE})", p=_OBJ_RE) + "$") for t in _TWO_TEMPLATES
]


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_caption(text: str) -> Scene:
    """Invert :func:`caption`; raises ``ValueError`` for text no template produces."""
    text = _normalise(text)
    for pattern in _ONE_RES:
        if m := pattern.match(text):
            g = m.groups()
            if g[0] in _WHERE.values():  # "{w}, a {o}" puts the position first
                g = g[1:] + g[:1]
            position = next(k for k, v in _WHERE.items() if v == g[3])
            return Scene((Obj(g[2], g[1], g[0], position),))
    for pattern in _TWO_RES:
        if m := pattern.match(text):
            g = m.groups()
            relation = next(k for k, ps in _RELATION_PHRASES.items() if g[3] in ps)
            return Scene((Obj(g[2], g[1], g[0]), Obj(g[6], g[5], g[4])), relation)
    raise ValueError(f"no caption template matches {text!r}")


REBINDABLE = ("colour", "shape", "size", "relation")
_GROUPS = {"size": (1, 5), "colour": (2, 6), "shape": (3, 7)}  # of a _TWO_RES match
_REVERSED = {  # each relation phrase -> the reversed relation's phrase of the same style
    p: q
    for a, b in _FLIP.items()
    for p, q in zip(_RELATION_PHRASES[a], _RELATION_PHRASES[b], strict=True)
}


def rebindings(text: str, *, fields: tuple[str, ...] = REBINDABLE) -> list[str]:
    """The captions naming the words of the two-object caption ``text`` bound differently: each
    subset of ``fields`` exchanged between the two objects (``"relation"``: the relation reversed),
    in ``text``'s template, one per scene other than ``text``'s; [] for a one-object caption.

    A sample that binds the caption's attributes wrongly shows one of these scenes.
    """
    unknown = set(fields) - set(REBINDABLE)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; rebindable: {REBINDABLE}")
    text = _normalise(text)
    match = next((m for pattern in _TWO_RES if (m := pattern.match(text))), None)
    if match is None:
        parse_caption(text)  # a one-object caption, or a ValueError naming the text
        return []
    seen, out = {parse_caption(text).canonical()}, []
    for exchanged in itertools.product((False, True), repeat=len(fields)):
        words = {k: match.group(k) for k in range(1, 8)}
        for field, flip in zip(fields, exchanged, strict=True):
            if flip and field == "relation":
                words[4] = _REVERSED[words[4]]
            elif flip:
                a, b = _GROUPS[field]
                words[a], words[b] = words[b], words[a]
        pieces, end = [], 0
        for k in range(1, 8):
            pieces += [text[end : match.start(k)], words[k]]
            end = match.end(k)
        rebound = "".join(pieces) + text[end:]
        if (scene := parse_caption(rebound).canonical()) not in seen:
            seen.add(scene)
            out.append(rebound)
    return out


def colours_and_shapes_differ(scene: Scene) -> bool:
    """Whether ``scene`` has two objects of different colours and different shapes: the scenes
    where a sample can bind either attribute to the wrong object."""
    if len(scene.objects) != 2:
        return False
    a, b = scene.objects
    return a.colour != b.colour and a.shape != b.shape


@functools.cache
def _mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of ``shape`` filling its box, drawn without antialiasing."""
    im = Image.new("1", (w, h))
    draw = ImageDraw.Draw(im)
    r, b = w - 1, h - 1
    if shape == "circle":
        draw.ellipse((0, 0, r, b), fill=1)
    elif shape == "square":
        draw.rectangle((0, 0, r, b), fill=1)
    elif shape == "triangle":
        draw.polygon([(0, b), (r, b), (r / 2, 0)], fill=1)
    elif shape == "diamond":
        draw.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=1)
    elif shape == "cross":
        tw, th = max(1, round(0.4 * w)), max(1, round(0.4 * h))
        draw.rectangle(((w - tw) // 2, 0, (w - tw) // 2 + tw - 1, b), fill=1)
        draw.rectangle((0, (h - th) // 2, r, (h - th) // 2 + th - 1), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array(im, bool)


def render(scene: Scene, boxes: list[tuple[int, int, int]], size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 image; ``boxes`` holds each object's ``(x0, y0, side)``."""
    image = np.zeros((size, size, 3), np.uint8)
    for o, (x0, y0, d) in zip(scene.objects, boxes, strict=True):
        image[y0 : y0 + d, x0 : x0 + d][_mask(o.shape, d, d)] = PALETTE[o.colour]
    return image


def _place(rng: np.random.Generator, side: int, fx: float, fy: float, size: int, jitter: float):
    cx, cy = (np.array([fx, fy]) + rng.uniform(-jitter, jitter, 2)) * size
    x0 = int(np.clip(round(cx - side / 2), 0, size - side))
    y0 = int(np.clip(round(cy - side / 2), 0, size - side))
    return x0, y0, side


def _sample(rng: np.random.Generator, size: int, held_out: frozenset, split: str):
    def obj(position=None, force_held_out=False):
        if force_held_out:
            colour, shape = sorted(held_out)[rng.integers(len(held_out))]
        else:
            while True:
                colour = COLOURS[rng.integers(len(COLOURS))]
                shape = SHAPES[rng.integers(len(SHAPES))]
                if split != "train" or (colour, shape) not in held_out:
                    break
        return Obj(shape, colour, SIZES[rng.integers(2)], position)

    def side(o):
        lo, hi = _SIDE[o.size]
        return round(size * rng.uniform(lo, hi))

    # Validation and test oversample held-out pairs: half the scenes contain one.
    force = split != "train" and bool(held_out) and rng.random() < 0.5
    if rng.random() < 0.5:
        o = obj(POSITIONS[rng.integers(len(POSITIONS))], force)
        return Scene((o,)), [_place(rng, side(o), *_ANCHOR[o.position], size, 0.05)]
    relation = RELATIONS[rng.integers(4)]
    first = force and rng.random() < 0.5
    a, b = obj(force_held_out=first), obj(force_held_out=force and not first)
    while b == a:  # identical objects would make the relation unverifiable
        b = obj()
    # Anchors of objects[0] and objects[1].
    ends = (
        ((0.25, 0.5), (0.75, 0.5))
        if relation in ("left of", "right of")
        else ((0.5, 0.25), (0.5, 0.75))
    )
    if relation in ("right of", "below"):
        ends = ends[::-1]
    while True:
        boxes = [_place(rng, side(o), *e, size, 0.04) for o, e in zip((a, b), ends, strict=True)]
        (ax, ay, ad), (bx, by, bd) = boxes
        if (
            ax + ad + _GAP <= bx
            or bx + bd + _GAP <= ax
            or ay + ad + _GAP <= by
            or by + bd + _GAP <= ay
        ):
            return Scene((a, b), relation), boxes


def generate(
    n: int, size: int = 64, *, seed: int = 0, split: str = "train", held_out=HELD_OUT
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images ``(n, size, size, 3)`` uint8 with captions and scenes.

    Each split has its own random stream for a given ``seed``. ``held_out`` (colour, shape)
    pairs never appear in ``"train"``; half the validation and test scenes contain one.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    held_out = frozenset(held_out)
    images, captions, scenes = np.empty((n, size, size, 3), np.uint8), [], []
    for i in range(n):
        scene, boxes = _sample(rng, size, held_out, split)
        images[i] = render(scene, boxes, size)
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes


def generate_binding(
    n: int, size: int = 64, *, seed: int = 0, split: str = "test", held_out=HELD_OUT
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """The first ``n`` scenes of :func:`generate`'s stream for ``(seed, split)`` for which
    :func:`colours_and_shapes_differ` holds (about a third of its scenes), as it returns them."""
    drawn = 3 * n
    while True:
        images, captions, scenes = generate(drawn, size, seed=seed, split=split, held_out=held_out)
        keep = [i for i, scene in enumerate(scenes) if colours_and_shapes_differ(scene)][:n]
        if len(keep) == n:
            return images[keep], [captions[i] for i in keep], [scenes[i] for i in keep]
        drawn *= 2


def perturb(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with one attribute (shape, colour, size, position or relation) changed."""
    while True:
        objects = list(scene.objects)
        i = int(rng.integers(len(objects)))
        field = ("shape", "colour", "size", "relation" if scene.relation else "position")
        field = field[rng.integers(4)]
        choices = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
        if field == "relation":
            new = Scene(scene.objects, RELATIONS[rng.integers(4)])
        else:
            value = choices[field][rng.integers(len(choices[field]))]
            objects[i] = dataclasses.replace(objects[i], **{field: value})
            new = Scene(tuple(objects), scene.relation)
        if new.canonical() != scene.canonical():
            return new


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """Pixel coordinates ``(k, 2)`` of each 8-connected component of ``fg``."""
    seen, out = np.zeros_like(fg), []
    h, w = fg.shape
    for start in zip(*np.nonzero(fg), strict=True):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v in range(max(y - 1, 0), min(y + 2, h)):
                for u in range(max(x - 1, 0), min(x + 2, w)):
                    if fg[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(np.array(pixels))
    return out


def _classify(image: np.ndarray, pixels: np.ndarray) -> tuple[Obj, np.ndarray]:
    """The object drawn at ``pixels`` (without position) and its bbox centre ``(x, y)``."""
    size = image.shape[0]
    (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    crop = np.zeros((h, w), bool)
    crop[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
    # Nearest shape by IoU with each shape drawn in the same box.
    iou = [(_mask(s, w, h) & crop).sum() / (_mask(s, w, h) | crop).sum() for s in SHAPES]
    rgb = np.median(image[pixels[:, 0], pixels[:, 1]].astype(np.float32), 0)
    palette = np.array(list(PALETTE.values()), np.float32)
    colour = COLOURS[int(np.argmin(((palette - rgb) ** 2).sum(1)))]
    large = int(max(h, w) > _SIZE_THRESHOLD * size)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    return Obj(SHAPES[int(np.argmax(iou))], colour, SIZES[large]), centre


def parse(image: np.ndarray) -> Scene:
    """The scene drawn in ``image`` ``(size, size, 3)``: its one or two largest objects."""
    size = image.shape[0]
    comps = _components(image.max(-1) > _FOREGROUND)
    # Stray specks from a generator are not objects.
    comps = sorted((c for c in comps if len(c) >= (0.1 * size) ** 2), key=len, reverse=True)[:2]
    found = [_classify(image, c) for c in comps]
    if len(found) == 1:
        ((o, centre),) = found
        d = centre - (size - 1) / 2
        if np.abs(d).max() < _CENTRE_RADIUS * size:
            position = "centre"
        elif abs(d[0]) >= abs(d[1]):
            position = "left" if d[0] < 0 else "right"
        else:
            position = "top" if d[1] < 0 else "bottom"
        return Scene((dataclasses.replace(o, position=position),))
    if len(found) == 2:
        (a, ca), (b, cb) = found
        dx, dy = cb - ca
        if abs(dx) >= abs(dy):
            return Scene((a, b), "left of") if dx > 0 else Scene((b, a), "left of")
        return Scene((a, b), "above") if dy > 0 else Scene((b, a), "above")
    return Scene(tuple(o for o, _ in found))


def check(image: np.ndarray, text: str) -> bool:
    """Whether ``image`` shows the scene ``text`` describes."""
    return parse(image).canonical() == parse_caption(text).canonical()


def _pairs(scene: Scene) -> list[tuple[str, str]]:
    return sorted((o.colour, o.shape) for o in scene.objects)


def verdict(image: np.ndarray, text: str) -> dict[str, bool]:
    """:func:`check` as ``correct``, and for a two-object caption ``bound`` (both (colour, shape)
    objects drawn, whatever their sizes and places) and ``swapped`` (the two shapes drawn with each
    other's colours; only visible when both the colours and the shapes differ)."""
    wanted, drawn = parse_caption(text), parse(image)
    out = {"correct": drawn.canonical() == wanted.canonical()}
    if wanted.relation is not None:
        (ca, sa), (cb, sb) = [(o.colour, o.shape) for o in wanted.objects]
        out["bound"] = _pairs(drawn) == _pairs(wanted)
        out["swapped"] = ca != cb and sa != sb and _pairs(drawn) == sorted([(cb, sa), (ca, sb)])
    return out


ATTRIBUTES = ("count", "colours", "shapes", "sizes", "position")


def attributes(image: np.ndarray, text: str) -> dict[str, bool]:
    """Each attribute of the scene ``text`` describes, judged on ``image`` on its own: the object
    ``count``, and the ``colours``, ``shapes`` and ``sizes`` as multisets over the objects (a
    right shape in the wrong colour counts for ``shapes``; a wrong count fails all three); for a
    one-object caption also ``position``: which attribute a failed :func:`check` misses."""
    wanted, drawn = parse_caption(text), parse(image)
    out = {"count": len(drawn.objects) == len(wanted.objects)}
    for name, field in (("colours", "colour"), ("shapes", "shape"), ("sizes", "size")):
        out[name] = sorted(getattr(o, field) for o in drawn.objects) == sorted(
            getattr(o, field) for o in wanted.objects
        )
    if wanted.relation is None:
        out["position"] = out["count"] and drawn.objects[0].position == wanted.objects[0].position
    return out
