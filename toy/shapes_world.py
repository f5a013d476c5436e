"""Shapes world: procedural 32x32 images, text prompts and a GenEval-like scorer.

This is the CPU stand-in for MMaDA text-to-image with GenEval rewards. GenEval (Ghosh et al. 2023,
arXiv 2310.11513) runs an object detector on each generated image and checks the prompt's objects, counts,
colours and positions; here the "photos" are coloured shapes on black and the "detector" is exact pixel
arithmetic, so a reward costs microseconds and every check is verifiable.

World
-----
- Image: (3, 32, 32) float RGB in [0, 1], black background.
- Colours (PALETTE): red (1,0,0), green (0,1,0), blue (0,0,1), yellow (1,1,0).
- Shapes, drawn in an s x s bounding box, s in SIZES = (8,) pixels: square (fills the box, fill ratio
  1.0), circle (0.81), triangle (apex up, base at the bottom, 0.50).
- Grid: box corners lie on multiples of GRID = 4 pixels, so with the tokenizer's 4x4-pixel patches every
  object covers exactly 2x2 tokens. (This world's first version put boxes of sides 8-11 at any pixel
  offset; the toy's 0.4 M-parameter model then could hardly draw: held-out overall 0.06-0.12 after SFT.)
- Position: "left" means the object's centroid x < 16 (the left half), "right" x > 16, "top" y < 16,
  "bottom" y > 16, in pixel-centre coordinates (pixel (row i, col j) has centre (j + 0.5, i + 0.5)).
  Renders put the whole bounding box inside the named half.
- Objects never overlap: bounding boxes are at least GAP = 2 background pixels apart (GRID = 4 on the
  grid), so each object is its own connected component.

Prompts and GenEval's six categories (tag names as in GenEval)
--------------------------------------------------------------
A prompt is a PromptSpec: one or two ObjectSpecs (shape, optional colour, count, optional position). Its
text is generated from the spec, and its words index into VOCAB (PAD_ID pads to MAX_PROMPT_LEN = 8):

    category       example                           encode_prompt(...)
    single_object  a circle                          [1, 9, 0, 0, 0, 0, 0, 0]
    two_object     a circle and a square             [1, 9, 14, 1, 8, 0, 0, 0]
    counting       three triangles                   [3, 13, 0, 0, 0, 0, 0, 0]
    colors         a yellow square                   [1, 7, 8, 0, 0, 0, 0, 0]
    position       a triangle on the left            [1, 10, 15, 16, 17, 0, 0, 0]
    color_attr     a red circle and a blue square    [1, 4, 9, 14, 1, 6, 8, 0]

>>> spec = parse_prompt("a red circle and a blue square")
>>> spec.category, encode_prompt(spec)
('color_attr', [1, 4, 9, 14, 1, 6, 8, 0])
>>> prompt_text(parse_prompt(decode_prompt(encode_prompt(spec)))) == prompt_text(spec)
True
>>> parse_prompt("two red circles on the left").category  # any valid spec renders and scores
'other'

Train / held-out split
----------------------
prompt_set() enumerates every prompt the six category templates can make (111). Within each category,
prompts are ranked by the MD5 hash of their text and the first max(1, round(HELDOUT_FRACTION * n)) are
held out (21 prompts, e.g. "a triangle", "three triangles", "a yellow square and a green triangle"); the rest are
train. The split is fixed (no seed) and disjoint by construction; sample_specs draws from one side.

Scoring (score_images)
----------------------
Pixels are classified to the nearest of black + PALETTE (background unless within COLOUR_TOL of a palette
colour); 8-connected same-colour components with at least MIN_AREA pixels are objects. An object's shape
comes from the CORNER x CORNER blocks in the corners of its bounding box: a square fills all four, a circle
leaves all four mostly empty (at most 1/4 filled), a triangle fills the bottom two (3/4) and not the top two. A pair
of blocks at least CORNER_FULL filled counts as full: top and bottom full -> square, bottom only ->
triangle, neither -> circle. The fill ratio (area / box area; rendered squares 1.0, circles 0.81,
triangles 0.50) must lie in FILL_RANGE of that shape, and the box must be neither too elongated, too
big nor too small; otherwise the object's shape is "unknown" and it matches no requested object.
For every requested object:

    shape     some object has the requested shape
    colour    (if a colour is requested) some object has the requested shape and colour, as GenEval colours
              the detected objects of the requested class
    count     (if count > 1) exactly `count` objects match shape (+ colour)
    position  (if requested) at least one object matches and every match has its centroid in that half

Per image: `score` = mean of the checks it requires (graded, for the RL reward); `strict` = 1 if all pass
(GenEval's per-image correctness). Per category: mean strict accuracy; `geneval` = mean over categories.
None of these checks that nothing else is drawn (nor does GenEval): "a triangle" drawn beside three
squares scores 1. `extra` counts the objects the prompt did not ask for (extra_objects): objects matching
none of its groups, including unknown shapes, plus a group's matches beyond its count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- world constants

IMAGE_SIZE = 32  # images are (3, IMAGE_SIZE, IMAGE_SIZE)
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
COLOURS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}  # count -> determiner
MAX_OBJECTS = 4  # total rendered instances per image (e.g. "two circles and two squares")
MAX_IN_HALF = 2  # objects of one group with a position (e.g. "two red circles on the left")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# rendering
GRID = 4  # box corners and sides are multiples of GRID pixels: objects align with the tokenizer's 4x4 patches
SIZES = (8,)  # bounding-box sides in pixels (multiples of GRID)
GAP = 2  # min background pixels between two bounding boxes (so, on the grid, at least GRID)
PLACEMENT_CANDIDATES = 64  # candidate boxes drawn per object per attempt
PLACEMENT_ATTEMPTS = 20  # whole-layout restarts before giving up

# scoring
COLOUR_TOL = 0.5  # max RGB distance from a palette colour for a pixel to count as that colour
MIN_AREA = 8  # components with fewer pixels are noise
MIN_SIDE, MAX_SIDE = 4, 14  # bounding-box sides outside this range make a component "unknown"
MAX_ASPECT = 1.5  # long side / short side above this makes a component "unknown"
CORNER = 2  # side of the corner blocks of a bounding box that tell the shapes apart
CORNER_FULL = 0.6  # a pair of corner blocks this full is "full": square top and bottom, triangle bottom only
FILL_RANGE = {"square": (0.8, 1.0), "circle": (0.6, 0.92), "triangle": (0.35, 0.85)}  # area / box area; else unknown

# splits
HELDOUT_FRACTION = 0.2

# ----------------------------------------------------------------------------- vocabulary

PAD = "<pad>"
VOCAB: list[str] = [
    PAD,
    *COUNT_WORDS.values(),  # a two three
    *COLOURS,
    *SHAPES,
    *PLURALS.values(),
    "and",
    "on",
    "the",
    *POSITIONS,
]
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID = WORD_TO_ID[PAD]
MAX_PROMPT_LEN = 8  # words; encode_prompt pads to this length


# ----------------------------------------------------------------------------- prompt specs


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object group: `count` objects of `shape`, optionally all `colour` and in `position`."""

    shape: str
    colour: str | None = None
    count: int = 1
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {self.shape!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"colour: expected None or one of {COLOURS}, got {self.colour!r}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count: expected one of {tuple(COUNT_WORDS)}, got {self.count!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position: expected None or one of {POSITIONS}, got {self.position!r}")
        if self.position is not None and self.count > MAX_IN_HALF:
            raise ValueError(f"count: at most {MAX_IN_HALF} objects fit in one half, got {self.count} on the {self.position}")

    def words(self) -> list[str]:
        """E.g. ["two", "red", "circles", "on", "the", "left"]."""
        out = [COUNT_WORDS[self.count]]
        if self.colour is not None:
            out.append(self.colour)
        out.append(self.shape if self.count == 1 else PLURALS[self.shape])
        if self.position is not None:
            out += ["on", "the", self.position]
        return out


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: one or two distinguishable object groups, at most MAX_PROMPT_LEN words."""

    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        objs = self.objects
        if not isinstance(objs, tuple) or not all(isinstance(o, ObjectSpec) for o in objs):
            raise ValueError(f"objects: expected a tuple of ObjectSpec, got {objs!r}")
        if len(objs) not in (1, 2):
            raise ValueError(f"objects: expected 1 or 2 object groups, got {len(objs)}")
        if len(objs) == 2:
            a, b = objs
            if a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour):
                raise ValueError(f"objects: two groups of the same shape need two different colours, got {objs!r}")
        if sum(o.count for o in objs) > MAX_OBJECTS:
            raise ValueError(f"objects: at most {MAX_OBJECTS} objects in total, got {sum(o.count for o in objs)}")
        if len(self.words()) > MAX_PROMPT_LEN:
            raise ValueError(f"objects: prompt {' '.join(self.words())!r} is longer than {MAX_PROMPT_LEN} words")

    def words(self) -> list[str]:
        out = self.objects[0].words()
        for o in self.objects[1:]:
            out += ["and", *o.words()]
        return out

    @property
    def category(self) -> str:
        """GenEval tag of the prompt's template, or "other" for combinations GenEval has no tag for."""
        if len(self.objects) == 2:
            if all(o.count == 1 and o.position is None for o in self.objects):
                if all(o.colour is None for o in self.objects):
                    return "two_object"
                if all(o.colour is not None for o in self.objects):
                    return "color_attr"
            return "other"
        (o,) = self.objects
        flags = (o.colour is not None, o.count > 1, o.position is not None)
        by_flags = {
            (False, False, False): "single_object",
            (False, True, False): "counting",
            (True, False, False): "colors",
            (False, False, True): "position",
        }
        return by_flags.get(flags, "other")


def prompt_text(spec: PromptSpec) -> str:
    """The prompt's words joined by spaces, e.g. "a red circle and a blue square"."""
    return " ".join(spec.words())


def encode_prompt(spec: PromptSpec) -> list[int]:
    """Ids into VOCAB, padded with PAD_ID to MAX_PROMPT_LEN."""
    ids = [WORD_TO_ID[w] for w in spec.words()]
    return ids + [PAD_ID] * (MAX_PROMPT_LEN - len(ids))


def encode_prompts(specs: Sequence[PromptSpec]) -> torch.Tensor:
    """(B, MAX_PROMPT_LEN) long tensor of encode_prompt rows."""
    return torch.tensor([encode_prompt(s) for s in specs], dtype=torch.long).view(len(specs), MAX_PROMPT_LEN)


def decode_prompt(ids: Sequence[int] | torch.Tensor) -> str:
    """Inverse of encode_prompt up to padding: ids -> "a red circle"."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(VOCAB)]
    if bad:
        raise ValueError(f"ids: expected ids in [0, {len(VOCAB)}), got {bad}")
    return " ".join(VOCAB[i] for i in ids if i != PAD_ID)


def parse_prompt(text: str) -> PromptSpec:
    """Inverse of prompt_text: "two red circles on the left" -> PromptSpec. Raises ValueError on bad text."""
    words = text.split()
    phrases: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            phrases.append([])
        else:
            phrases[-1].append(w)
    objects = []
    for phrase in phrases:
        rest = list(phrase)
        count = {v: k for k, v in COUNT_WORDS.items()}.get(rest.pop(0) if rest else "")
        colour = rest.pop(0) if rest and rest[0] in COLOURS else None
        noun = rest.pop(0) if rest else ""
        singular = {p: s for s, p in PLURALS.items()}.get(noun, noun)
        position = None
        if rest[:2] == ["on", "the"] and len(rest) == 3:
            position, rest = rest[2], []
        if count is None or singular not in SHAPES or (noun in SHAPES) != (count == 1) or rest:
            raise ValueError(f"text: cannot parse phrase {' '.join(phrase)!r} of {text!r}")
        objects.append(ObjectSpec(singular, colour, count, position))
    return PromptSpec(tuple(objects))


# ----------------------------------------------------------------------------- prompt sets and splits


def _template_prompts() -> dict[str, list[PromptSpec]]:
    """Every prompt the six GenEval-style templates can make, by category (111 in all)."""
    one = lambda **kw: PromptSpec((ObjectSpec(**kw),))
    two = lambda a, b: PromptSpec((a, b))
    pairs = [(s, t) for s in SHAPES for t in SHAPES if s != t]
    colour_pairs = [(c, d) for c in COLOURS for d in COLOURS if c != d]
    return {
        "single_object": [one(shape=s) for s in SHAPES],
        "two_object": [two(ObjectSpec(s), ObjectSpec(t)) for s, t in pairs],
        "counting": [one(shape=s, count=n) for n in (2, 3) for s in SHAPES],
        "colors": [one(shape=s, colour=c) for c in COLOURS for s in SHAPES],
        "position": [one(shape=s, position=p) for p in POSITIONS for s in SHAPES],
        "color_attr": [two(ObjectSpec(s, c), ObjectSpec(t, d)) for c, d in colour_pairs for s, t in pairs],
    }


def _split_prompts() -> dict[str, dict[str, list[PromptSpec]]]:
    """{"train"|"heldout": {category: prompts}}; held out = the lowest-MD5 prompts of each category."""
    out: dict[str, dict[str, list[PromptSpec]]] = {"train": {}, "heldout": {}}
    for category, specs in _template_prompts().items():
        ranked = sorted(specs, key=lambda s: hashlib.md5(prompt_text(s).encode()).hexdigest())
        n_heldout = max(1, round(HELDOUT_FRACTION * len(ranked)))
        out["heldout"][category] = ranked[:n_heldout]
        out["train"][category] = ranked[n_heldout:]
    return out


_SPLITS = _split_prompts()


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {tuple(_SPLITS)}, got {split!r}")


def _check_categories(categories: Sequence[str]) -> None:
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories: expected a non-empty subset of {CATEGORIES}, got {tuple(categories)!r}")


def prompt_set(split: str = "train", categories: Sequence[str] = CATEGORIES) -> list[PromptSpec]:
    """All prompts of `split` ("train" or "heldout") in `categories`, in a fixed order."""
    _check_split(split)
    _check_categories(categories)
    return [s for c in categories for s in _SPLITS[split][c]]


def sample_specs(
    n: int, generator: torch.Generator, split: str = "train", categories: Sequence[str] = CATEGORIES
) -> list[PromptSpec]:
    """n prompts: a category uniformly from `categories`, then a prompt uniformly from that category's split."""
    _check_split(split)
    _check_categories(categories)
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    cat_idx = torch.randint(len(categories), (n,), generator=generator).tolist()
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    pools = [_SPLITS[split][c] for c in categories]
    return [pools[c][int(x * len(pools[c]))] for c, x in zip(cat_idx, u, strict=True)]


# ----------------------------------------------------------------------------- rendering


def _place(spec: PromptSpec, generator: torch.Generator) -> list[tuple[int, int, int, int, int]]:
    """Non-overlapping boxes for every instance: [(shape_id, colour_id, x0, y0, size), ...].

    Each instance draws PLACEMENT_CANDIDATES (size, x0, y0) triples from `generator` and takes the first that
    keeps GAP pixels from the boxes already placed; if none does, the whole layout restarts.
    """
    H = W = IMAGE_SIZE
    instances = [o for o in spec.objects for _ in range(o.count)]
    n = len(instances)
    random_colours = torch.randint(len(COLOURS), (n,), generator=generator).tolist()
    for _ in range(PLACEMENT_ATTEMPTS):
        u = torch.rand((n, PLACEMENT_CANDIDATES, 3), generator=generator, dtype=torch.float64).numpy()
        boxes: list[tuple[int, int, int, int, int]] = []
        for k, obj in enumerate(instances):
            size = np.array(SIZES)[(u[k, :, 0] * len(SIZES)).astype(np.int64)]  # (K,)
            x_lo, x_hi = np.zeros_like(size), W - size  # inclusive range of x0
            y_lo, y_hi = np.zeros_like(size), H - size
            if obj.position == "left":
                x_hi = np.minimum(x_hi, W // 2 - size)
            elif obj.position == "right":
                x_lo = np.maximum(x_lo, W // 2)
            elif obj.position == "top":
                y_hi = np.minimum(y_hi, H // 2 - size)
            elif obj.position == "bottom":
                y_lo = np.maximum(y_lo, H // 2)
            x0 = GRID * (x_lo // GRID + (u[k, :, 1] * (x_hi // GRID - x_lo // GRID + 1)).astype(np.int64))  # (K,)
            y0 = GRID * (y_lo // GRID + (u[k, :, 2] * (y_hi // GRID - y_lo // GRID + 1)).astype(np.int64))
            ok = np.ones_like(size, dtype=bool)
            for _, _, bx, by, bs in boxes:
                apart = (x0 >= bx + bs + GAP) | (bx >= x0 + size + GAP) | (y0 >= by + bs + GAP) | (by >= y0 + size + GAP)
                ok &= apart
            if not ok.any():
                break
            j = int(ok.argmax())
            colour = COLOURS.index(obj.colour) if obj.colour is not None else random_colours[k]
            boxes.append((SHAPES.index(obj.shape), colour, int(x0[j]), int(y0[j]), int(size[j])))
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {prompt_text(spec)!r} without overlap in {PLACEMENT_ATTEMPTS} attempts")


def shape_masks(shape_id: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(N,) box parameters -> (N, H, W) bool masks of the shapes drawn in those boxes."""
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    px, py = coords.view(1, 1, -1), coords.view(1, -1, 1)  # (1, 1, W), (1, H, 1)
    x0, y0, s = (t.float().view(-1, 1, 1) for t in (x0, y0, size))  # (N, 1, 1)
    cx, cy, half = x0 + s / 2, y0 + s / 2, s / 2
    in_box = (px >= x0) & (px < x0 + s) & (py >= y0) & (py < y0 + s)  # (N, H, W)
    square = in_box
    circle = (px - cx) ** 2 + (py - cy) ** 2 <= half**2
    triangle = in_box & ((px - cx).abs() <= (py - y0) / 2)  # half-width grows from 0 (apex, top) to s/2 (base)
    by_shape = torch.stack([square, circle, triangle], dim=1)  # (N, len(SHAPES), H, W) in SHAPES order
    return by_shape[torch.arange(len(shape_id)), shape_id.long()]


def render(specs: Sequence[PromptSpec], generator: torch.Generator) -> torch.Tensor:
    """Ground-truth images for `specs`: (B, 3, 32, 32) float in [0, 1].

    Deterministic given the specs and the generator's state; sizes, positions and the colours of objects
    without a requested colour are drawn from `generator` (spec by spec, in order).
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    rows = [(b, *box) for b, spec in enumerate(specs) for box in _place(spec, generator)]
    images = torch.zeros(len(specs), 3, IMAGE_SIZE, IMAGE_SIZE)
    if not rows:
        return images
    b, shape_id, colour_id, x0, y0, size = torch.tensor(rows, dtype=torch.long).unbind(1)  # each (N,)
    masks = shape_masks(shape_id, x0, y0, size).float()  # (N, H, W)
    rgb = torch.tensor(list(PALETTE.values()))[colour_id]  # (N, 3)
    images.index_add_(0, b, rgb[:, :, None, None] * masks[:, None])  # boxes never overlap, so sums stay in [0, 1]
    return images


# ----------------------------------------------------------------------------- scoring


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) long: 0 = background, 1 + i = COLOURS[i]."""
    refs = torch.tensor([(0.0, 0.0, 0.0), *PALETTE.values()], dtype=images.dtype)  # (1 + C, 3)
    # |x - r|^2 = |x|^2 - 2 x.r + |r|^2, for every pixel x and reference colour r
    sq_dist = (images**2).sum(1, keepdim=True) - 2 * torch.einsum("bchw,kc->bkhw", images, refs) + (refs**2).sum(1)[:, None, None]
    d2_min, cls = sq_dist.min(dim=1)  # (B, H, W)
    return torch.where(d2_min <= COLOUR_TOL**2, cls, 0)


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """Max over each pixel's 3x3 neighbourhood (zero padding), separably: (..., H, W) -> (..., H, W)."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])  # (..., H + 2, W)
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def connected_components(classes: torch.Tensor) -> torch.Tensor:
    """8-connected components of equal non-zero class: (B, H, W) long -> (B, H, W) long labels.

    Label 0 is background; a component's label is 1 + the largest flat pixel index in it. Each round takes
    the max label over the 3x3 neighbourhood within each class (a max-pool per class channel), then jumps
    pointers (a label names a pixel of the same component, so that pixel's label is also valid); it stops
    when nothing changes.
    """
    B, H, W = classes.shape
    n_classes = int(classes.max()) if classes.numel() else 0
    if n_classes <= 0:
        return torch.zeros_like(classes)
    members = classes[:, None] == torch.arange(1, n_classes + 1).view(1, -1, 1, 1)  # (B, C, H, W)
    flat_idx = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W)
    labels = torch.where(members, flat_idx, 0.0).amax(1, keepdim=True)  # (B, 1, H, W)
    while True:
        spread = _max3x3(torch.where(members, labels, 0.0))  # (B, C, H, W)
        flat = torch.where(members, spread, 0.0).amax(1).view(B, H * W).long()  # (B, HW)
        jumped = torch.where(flat > 0, flat.gather(1, (flat - 1).clamp(min=0)), 0)  # label of the pixel named
        new = torch.maximum(flat, jumped).view(B, 1, H, W).float()
        if torch.equal(new, labels):
            return labels.view(B, H, W).long()
        labels = new


@dataclass
class Components:
    """Objects found in a batch, one entry per component, as (M,) numpy arrays."""

    image: np.ndarray  # index into the batch
    colour: np.ndarray  # index into COLOURS
    shape: np.ndarray  # index into SHAPES, or -1 for unknown
    area: np.ndarray
    cx: np.ndarray  # centroid, pixel-centre coordinates
    cy: np.ndarray
    fill: np.ndarray  # area / bounding-box area
    corner_top: np.ndarray  # filled fraction of the two top corner blocks of the bounding box
    corner_bottom: np.ndarray  # same, bottom corners


def find_objects(images: torch.Tensor) -> Components:
    """Segment (B, 3, H, W) images into coloured components and classify their shapes."""
    B, _, H, W = images.shape
    classes = classify_pixels(images)  # (B, H, W)
    labels = connected_components(classes).view(B, H * W)  # (B, HW), 0 = background
    slots = H * W + 1
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    xs, ys = xs.reshape(1, -1).expand(B, -1), ys.reshape(1, -1).expand(B, -1)  # (B, HW)

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:  # per-label reduction -> (B, slots)
        out = torch.full((B, slots), init, dtype=torch.long)
        return out.scatter_reduce_(1, labels, values.long(), reduce=how, include_self=True)

    area = reduce(torch.ones_like(labels), "sum", 0)
    sum_x, sum_y = reduce(xs, "sum", 0), reduce(ys, "sum", 0)
    min_x, max_x = reduce(xs, "amin", W), reduce(xs, "amax", -1)
    min_y, max_y = reduce(ys, "amin", H), reduce(ys, "amax", -1)
    colour = reduce(classes.view(B, -1), "amax", 0) - 1
    # corner blocks: CORNER x CORNER squares in the four corners of each pixel's component's bounding box
    at = lambda t: t.gather(1, labels)  # (B, slots) per component -> (B, HW) per pixel
    near_side = ((xs - at(min_x)) < CORNER) | ((at(max_x) - xs) < CORNER)  # (B, HW)
    top_px = reduce(near_side & ((ys - at(min_y)) < CORNER), "sum", 0)
    bottom_px = reduce(near_side & ((at(max_y) - ys) < CORNER), "sum", 0)

    keep = area >= MIN_AREA
    keep[:, 0] = False  # background
    b, slot = keep.nonzero(as_tuple=True)
    pick = lambda t: t[b, slot].numpy()  # (B, slots) -> (M,) over kept components
    area_, w, h = pick(area), pick(max_x - min_x + 1), pick(max_y - min_y + 1)
    block = np.minimum(w, 2 * CORNER) * np.minimum(h, CORNER)  # pixels in the two top (or bottom) corner blocks
    fill, top, bottom = area_ / (w * h), pick(top_px) / block, pick(bottom_px) / block
    full_top, full_bottom = top >= CORNER_FULL, bottom >= CORNER_FULL
    shape = np.select(
        [full_top & full_bottom, ~full_top & full_bottom, ~full_top & ~full_bottom],
        [SHAPES.index("square"), SHAPES.index("triangle"), SHAPES.index("circle")],
        -1,  # top corners full, bottom corners empty: an upside-down triangle is no shape of ours
    )
    ranges = np.stack([np.array(FILL_RANGE[name]) for name in SHAPES])  # (len(SHAPES), 2)
    lo, hi = ranges[shape, 0], ranges[shape, 1]
    long_side, short_side = np.maximum(w, h), np.minimum(w, h)
    unknown = (long_side > MAX_SIDE) | (short_side < MIN_SIDE) | (long_side > MAX_ASPECT * short_side)
    unknown |= (fill < lo) | (fill > hi)
    return Components(
        image=b.numpy(),
        colour=pick(colour),
        shape=np.where(unknown, -1, shape),
        area=area_,
        cx=pick(sum_x) / area_ + 0.5,
        cy=pick(sum_y) / area_ + 0.5,
        fill=fill,
        corner_top=top,
        corner_bottom=bottom,
    )


def scenes(images: torch.Tensor) -> list[tuple]:
    """What each of (B, 3, H, W) images shows, as a hashable key: the sorted (shape, colour, grid column,
    grid row) of its detected objects (grid cells of GRID pixels). Two images with equal keys draw the same
    objects in the same places, whatever their code ids."""
    comps = find_objects(images.detach().float().cpu())
    keys: list[list] = [[] for _ in range(images.shape[0])]
    for b, shape, colour, cx, cy in zip(comps.image, comps.shape, comps.colour, comps.cx, comps.cy, strict=True):
        keys[b].append((int(shape), int(colour), int(cx // GRID), int(cy // GRID)))
    return [tuple(sorted(k)) for k in keys]


CHECKS = ("shape", "colour", "count", "position")


def _in_half(position: str, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    mid = IMAGE_SIZE / 2
    return {"left": cx < mid, "right": cx > mid, "top": cy < mid, "bottom": cy > mid}[position]


def check_image(spec: PromptSpec, comps: Components, mask: np.ndarray) -> dict[str, list[bool]]:
    """The checks `spec` requires, evaluated on the components comps[mask] of one image."""
    shape, colour, cx, cy = comps.shape[mask], comps.colour[mask], comps.cx[mask], comps.cy[mask]
    out: dict[str, list[bool]] = {c: [] for c in CHECKS}
    for obj in spec.objects:
        of_shape = shape == SHAPES.index(obj.shape)
        match = of_shape if obj.colour is None else of_shape & (colour == COLOURS.index(obj.colour))
        out["shape"].append(bool(of_shape.any()))
        if obj.colour is not None:
            out["colour"].append(bool(match.any()))
        if obj.count > 1:
            out["count"].append(int(match.sum()) == obj.count)
        if obj.position is not None:
            out["position"].append(bool(match.any() and _in_half(obj.position, cx[match], cy[match]).all()))
    return out


def extra_objects(spec: PromptSpec, comps: Components, mask: np.ndarray) -> int:
    """How many of the objects comps[mask] of one image the prompt did not ask for: objects that match none
    of its groups (another shape or colour, or an unknown shape), plus a group's matches beyond its count.
    The groups of a prompt never match the same object (PromptSpec's rule), so nothing is counted twice."""
    shape, colour = comps.shape[mask], comps.colour[mask]
    asked, surplus = np.zeros(len(shape), dtype=bool), 0
    for obj in spec.objects:
        match = shape == SHAPES.index(obj.shape)
        if obj.colour is not None:
            match &= colour == COLOURS.index(obj.colour)
        asked |= match
        surplus += max(0, int(match.sum()) - obj.count)
    return int((~asked).sum()) + surplus


def score_images(images: torch.Tensor, specs: Sequence[PromptSpec]) -> dict:
    """GenEval-like scores of (B, 3, 32, 32) images against their prompts.

    Returns a dict:
        score              (B,) float: mean of the image's required checks (graded; the RL reward)
        strict             (B,) float: 1.0 if every required check passes (GenEval's per-image correctness)
        checks             {name: (B,) float} for name in CHECKS: 1.0 if all of the image's checks of that
                           kind pass, 0.0 if one fails, nan if the prompt requires none
        categories         list of B category names (PromptSpec.category)
        category_accuracy  {category: mean strict} for the categories present
        objects            (B,) float: objects detected in the image
        extra              (B,) float: those the prompt did not ask for (extra_objects; GenEval does not check this)
        geneval            mean of category_accuracy over the six GenEval categories present (nan if none)
        geneval_se         its standard error over the images (the prompts held fixed): sqrt(sum_c s_c^2 / n_c) / K,
                           s_c^2 = unbiased variance of strict within category c, n_c its images, K categories
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images: expected shape (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if len(specs) != images.shape[0]:
        raise ValueError(f"specs: expected {images.shape[0]} specs (one per image), got {len(specs)}")
    B = len(specs)
    comps = find_objects(images.detach().float().cpu())
    starts = np.searchsorted(comps.image, np.arange(B + 1))  # comps.image is sorted
    score, strict, extra = torch.zeros(B), torch.zeros(B), torch.zeros(B)
    checks = {c: torch.full((B,), float("nan")) for c in CHECKS}
    for i, spec in enumerate(specs):
        mask = np.zeros(len(comps.image), dtype=bool)
        mask[starts[i] : starts[i + 1]] = True
        result = check_image(spec, comps, mask)
        flat = [ok for oks in result.values() for ok in oks]
        score[i], strict[i] = sum(flat) / len(flat), float(all(flat))
        extra[i] = extra_objects(spec, comps, mask)
        for name, oks in result.items():
            if oks:
                checks[name][i] = float(all(oks))
    categories = [s.category for s in specs]
    by_category = {c: strict[[i for i in range(B) if categories[i] == c]].double()
                   for c in (*CATEGORIES, "other") if c in categories}
    category_accuracy = {c: x.mean().item() for c, x in by_category.items()}
    geneval_cats = [c for c in CATEGORIES if c in by_category]
    # SE(geneval) = sqrt(sum_c s_c^2 / n_c) / K: the categories' images are independent draws
    geneval_var = sum(x.var().item() / len(x) if len(x) > 1 else math.nan for x in map(by_category.get, geneval_cats))
    return {
        "score": score,
        "strict": strict,
        "checks": checks,
        "objects": torch.from_numpy(np.diff(starts)).float(),
        "extra": extra,
        "categories": categories,
        "category_accuracy": category_accuracy,
        "geneval": float(np.mean([category_accuracy[c] for c in geneval_cats])) if geneval_cats else float("nan"),
        "geneval_se": math.sqrt(geneval_var) / len(geneval_cats) if geneval_cats else float("nan"),
    }
