"""Built-in visual question answering set, drawn on the fly with Pillow (no downloads).

Why: a first training run (and CI) needs image-text data whose answers depend on the pixels, that a tiny model
can learn in a few hundred steps, and whose held-out split shows it generalises. Each image holds simple shapes
(circle, square, triangle) in one of 6 clearly distinct colours on a light background; each gets one question
with exactly one short answer (a word or a digit):

* colour   -- one shape anywhere:                        "What colour is the circle?"  -> "red"
* shape    -- one shape anywhere:                        "What shape is in the image?" -> "triangle"
* count    -- 1..4 shapes of one colour and kind, at most one per quadrant: "How many squares are there?" -> "3"
* position -- one shape well inside the left/right/top/bottom half, centred on the other axis: "left"

Sizes are chosen so a CPU-sized model learns every question type in minutes: shapes are large (a quarter to
half of the image wide for colour / shape questions), and counted shapes sit one per quadrant (jittered inside
it), so counting needs no finer vision than the 2 x 2 merged tokens of a 64-pixel image.

Everything is a pure function of (seed, split, index): train and eval use disjoint seed streams.
Records have the JSONL loader's form, {"images": [PIL.Image], "conversations": [...]}, so both share one path;
"meta" carries the drawn parameters (for tests and eval breakdowns) and is ignored by the sample builder.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = ["COLOURS", "SHAPES", "POSITIONS", "QUESTION_TYPES", "TEMPLATES", "Scene", "draw_scene", "make_scene",
           "make_record", "SyntheticSource"]

COLOURS = {  # far apart in RGB and in name
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
QUESTION_TYPES = ("colour", "shape", "count", "position")
SPLITS = {"train": 0, "eval": 1}

TEMPLATES = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "shape": ("What shape is in the image?", "Which shape is shown?"),
    "count": ("How many {shape}s are there?", "Count the {shape}s."),
    "position": ("Where is the {shape}?", "In which half of the image is the {shape}?"),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """What to draw: `centres` are (x, y) pixel centres, `radius` the half-size of every shape."""
    shape: str
    colour: str
    centres: tuple[tuple[int, int], ...]
    radius: int
    background: int = 255  # grey level


def draw_scene(scene: Scene, image_size: int = 64) -> PIL.Image.Image:
    """Render a scene. The pixel at each centre is always inside its shape (also for triangles)."""
    img = PIL.Image.new("RGB", (image_size, image_size), (scene.background,) * 3)
    draw = PIL.ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    r = scene.radius
    for x, y in scene.centres:
        box = (x - r, y - r, x + r, y + r)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "triangle":  # apex up; at height y it spans x +- r/2
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    return img


def position_of(scene: Scene, image_size: int) -> str:
    """left/right/top/bottom: the half the (single) shape is in, along its farther-from-centre axis."""
    (x, y), = scene.centres
    dx, dy = x - image_size / 2, y - image_size / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def make_scene(rng: np.random.Generator, kind: str, image_size: int = 64) -> tuple[Scene, str]:
    """A random scene for one question type and its answer."""
    size = image_size
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = int(rng.integers(225, 256))
    if kind == "count":
        n = int(rng.integers(1, 5))
        r = max(3, round(size * rng.uniform(0.1, 0.13)))
        half = size // 2
        quadrants = rng.permutation(4)[:n]
        centres = tuple((int(q % 2 * half + rng.integers(r + 1, half - r - 1)),
                         int(q // 2 * half + rng.integers(r + 1, half - r - 1))) for q in sorted(quadrants))
        return Scene(shape, colour, centres, r, background), str(n)
    if kind == "position":
        r = max(3, round(size * rng.uniform(0.1, 0.14)))
        where = POSITIONS[rng.integers(len(POSITIONS))]
        far = int(rng.integers(r + 1, size // 2 - r))  # whole shape inside the near half
        far = far if where in ("left", "top") else size - 1 - far
        mid = int(round(size / 2 + rng.uniform(-0.08, 0.08) * size))  # centred on the other axis
        centre = (far, mid) if where in ("left", "right") else (mid, far)
        scene = Scene(shape, colour, (centre,), r, background)
        assert position_of(scene, size) == where
        return scene, where
    if kind in ("colour", "shape"):
        r = max(4, round(size * rng.uniform(0.22, 0.32)))
        centre = tuple(int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
        scene = Scene(shape, colour, (centre,), r, background)
        return scene, (colour if kind == "colour" else shape)
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def make_record(split: str, index: int, *, image_size: int = 64, seed: int = 0) -> dict:
    """Example `index` of `split` ("train" | "eval"): deterministic in (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {tuple(SPLITS)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # balanced question types
    scene, answer = make_scene(rng, kind, image_size)
    templates = TEMPLATES[kind]
    question = templates[rng.integers(len(templates))].format(shape=scene.shape)
    return {
        "images": [draw_scene(scene, image_size)],
        "conversations": [{"from": "human", "value": "<image>\n" + question},
                          {"from": "gpt", "value": answer}],
        "meta": {"kind": kind, "answer": answer, "scene": dataclasses.asdict(scene), "index": int(index),
                 "split": split},
    }


class SyntheticSource:
    """Random-access source of `size` synthetic records (see module docstring)."""

    def __init__(self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {tuple(SPLITS)}")
        if size <= 0 or image_size < 32:
            raise ValueError(f"SyntheticSource needs size > 0 and image_size >= 32, got {size}, {image_size}")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic index {index} out of range [0, {self.size})")
        return make_record(self.split, index, image_size=self.image_size, seed=self.seed)

    def __repr__(self):
        return (f"SyntheticSource(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed})")
