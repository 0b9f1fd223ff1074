"""The procedural captioned-shapes world the embedded default model is pretrained on.

Every image is one shape (circle, square, triangle, star, ring) of one color, at a random size
in one of the 3x3 cells of a position grid, on a background: either a flat background color,
captioned "a red circle on a blue background" (the grammar of `refl_engine.data.toy_prompts()`),
or a two-tone scene ("a painting of a sky with a red circle"). Most captions also name the cell
("a red circle in the top left on a blue background", "... with a red circle at the bottom");
the rest leave the position free. Captions only use words of `vocabulary()` (the tiny tokenizer's
words plus the position words), which `tokenizer()` encodes (most as one token each).

Positions are drawn with a gap between neighbouring cells (a shape is either clearly off-centre
or within a fifth of its free travel of the centre), so the cell is a label an image shows
rather than a threshold a pixel decides.

Rendering is plain numpy: the shape's coverage is computed on a grid `supersample` times finer
than the image and box-averaged down, which anti-aliases the edges. Everything is a pure
function of the seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data import article

RESOLUTION = 32

# Named colors (sRGB in [0, 1]); the names are the caption words.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.68, 0.20),
    "blue": (0.12, 0.25, 0.88),
    "yellow": (0.96, 0.88, 0.12),
    "orange": (0.97, 0.55, 0.08),
    "purple": (0.52, 0.16, 0.68),
    "pink": (0.98, 0.55, 0.76),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")

# Scenes: a vertical two-tone gradient (top, bottom) and the shape colors that would not stand out.
SCENES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], tuple[str, ...]]] = {
    "sky": ((0.35, 0.60, 0.95), (0.75, 0.88, 1.00), ("blue", "white")),
    "sea": ((0.05, 0.25, 0.55), (0.10, 0.45, 0.70), ("blue", "purple", "black")),
    "field": ((0.55, 0.80, 0.95), (0.20, 0.60, 0.15), ("green",)),
    "city": ((0.45, 0.45, 0.50), (0.25, 0.25, 0.28), ("gray", "black")),
    "mountain": ((0.70, 0.80, 0.90), (0.45, 0.35, 0.25), ("gray", "white")),
    "sunset": ((0.99, 0.70, 0.30), (0.88, 0.35, 0.22), ("orange", "red", "pink", "yellow")),
    "night": ((0.02, 0.02, 0.10), (0.08, 0.08, 0.25), ("black", "blue", "purple")),
}
SCENE_FRACTION = 0.15  # share of images drawn as scenes rather than flat backgrounds
POSITION_FRACTION = 0.6  # share of captions that name the shape's cell

# The 3x3 grid: row 0..2 top to bottom, col 0..2 left to right; the caption phrase of each cell.
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
# Offset of the center from the image center per row/col, as a fraction of the shape's free travel
# (half the image minus its radius and a 1-pixel margin); the gaps keep neighbouring cells apart.
POSITION_BANDS = ((-1.0, -0.45), (-0.2, 0.2), (0.45, 1.0))
RADIUS_RANGE = (0.18, 0.30)  # circumradius as a fraction of the image side

# The caption words: the tiny tokenizer's (refl_engine.models.load.TINY_SD_WORDS) and the position words.
POSITION_WORDS = ("at", "top", "bottom", "left", "right", "center")


@dataclass(frozen=True)
class Scene:
    """One image's content: everything `render` needs, and the caption."""

    shape: str
    color: str
    background: str  # a color name, or a scene name when `scene` is True
    cx: float  # center, in pixels of the RESOLUTION image (0 = left edge)
    cy: float
    radius: float  # circumradius in pixels
    scene: bool = False
    row: int = 1  # the position grid cell the center was drawn in (see POSITIONS)
    col: int = 1
    positioned: bool = False  # whether the caption names the cell

    @property
    def cell(self) -> int:
        """The grid cell as one index, row-major: 0 top left .. 4 center .. 8 bottom right."""
        return 3 * self.row + self.col

    @property
    def caption(self) -> str:
        where = f" {POSITIONS[self.row, self.col]}" if self.positioned else ""
        if self.scene:
            return f"a painting of a {self.background} with {article(self.color)} {self.color} {self.shape}{where}"
        return f"{article(self.color)} {self.color} {self.shape}{where} on {article(self.background)} {self.background} background"


_PHRASE_CELL = {tuple(p.split()): cell for cell, p in POSITIONS.items()}


def _split_position(words: list[str], at: int) -> tuple[list[str], tuple[int, int] | None]:
    """Remove a position phrase starting at word `at`, if there is one; return the words left and
    the (row, col) it names."""
    for n in (4, 3):  # "in the top left" before "at the top"
        cell = _PHRASE_CELL.get(tuple(words[at:at + n]))
        if cell is not None:
            return words[:at] + words[at + n:], cell
    return words, None


def parse_caption(caption: str) -> dict | None:
    """The (color, shape, background, row, col) a caption of this world names, or None if it is
    not one. For a scene caption `background` is the scene name and `scene` is True; `row` and
    `col` are None when the caption does not name a position."""
    words = caption.strip().lower().split()
    if len(words) > 3 and words[1] == "painting":
        words, cell = _split_position(words, 9)
    else:
        words, cell = _split_position(words, 3)
    parsed = _parse_unpositioned(words)
    if parsed is not None:
        parsed.update(row=None if cell is None else cell[0], col=None if cell is None else cell[1])
    return parsed


def _parse_unpositioned(words: list[str]) -> dict | None:
    if (len(words) == 7 and words[0] in ("a", "an") and words[3] == "on" and words[4] in ("a", "an")
            and words[6] == "background" and words[1] in COLORS and words[2] in SHAPES and words[5] in COLORS):
        return dict(color=words[1], shape=words[2], background=words[5], scene=False)
    if (len(words) == 9 and words[:4] == ["a", "painting", "of", "a"] and words[5] == "with" and words[6] in ("a", "an")
            and words[4] in SCENES and words[7] in COLORS and words[8] in SHAPES):
        return dict(color=words[7], shape=words[8], background=words[4], scene=True)
    return None


def sample_scene(rng: np.random.Generator, size: int = RESOLUTION) -> Scene:
    """Draw one scene: shape, colors, size, grid cell and position in it, whether the caption
    names the cell."""
    names = list(COLORS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    if rng.random() < SCENE_FRACTION:
        background = list(SCENES)[rng.integers(len(SCENES))]
        allowed = [c for c in names if c not in SCENES[background][2]]
        color = allowed[rng.integers(len(allowed))]
        is_scene = True
    else:
        color = names[rng.integers(len(names))]
        others = [c for c in names if c != color]
        background = others[rng.integers(len(others))]
        is_scene = False
    radius = float(rng.uniform(*RADIUS_RANGE) * size)
    row, col = int(rng.integers(3)), int(rng.integers(3))
    cx, cy = place(rng, row, col, radius, size)
    positioned = bool(rng.random() < POSITION_FRACTION)
    return Scene(shape, color, background, cx, cy, radius, is_scene, row, col, positioned)


def place(rng: np.random.Generator, row: int, col: int, radius: float, size: int = RESOLUTION) -> tuple[float, float]:
    """A center (cx, cy) in grid cell (row, col) for a shape of this circumradius."""
    travel = size / 2 - (radius + 1.0)  # the center's free travel either side of the image center
    cy = float(size / 2 + rng.uniform(*POSITION_BANDS[row]) * travel)
    cx = float(size / 2 + rng.uniform(*POSITION_BANDS[col]) * travel)
    return cx, cy


def _polygon_inside(px: np.ndarray, py: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for every (px, py)."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x1, y1, x2, y2 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _regular_vertices(cx, cy, radius, n, inner=None):
    """Vertices of a regular n-gon (or an n-pointed star with inner radius `inner`), point up."""
    count = 2 * n if inner is not None else n
    k = np.arange(count)
    angle = -math.pi / 2 + k * (2 * math.pi / count)
    r = np.full(count, radius) if inner is None else np.where(k % 2 == 0, radius, inner)
    return cx + r * np.cos(angle), cy + r * np.sin(angle)


def coverage(scene: Scene, size: int = RESOLUTION, supersample: int = 4) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the fraction of each pixel the shape covers."""
    s = supersample
    coords = (np.arange(size * s) + 0.5) / s  # sub-pixel centers in pixel units
    py, px = np.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = px - scene.cx, py - scene.cy, scene.radius
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "ring":
        d2 = dx * dx + dy * dy
        inside = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif scene.shape == "square":
        half = r / math.sqrt(2)
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":
        # equilateral, centroid a bit below the circumcenter so the triangle sits centered
        vx, vy = _regular_vertices(scene.cx, scene.cy + 0.15 * r, r * 1.1, 3)
        inside = _polygon_inside(px, py, vx, vy)
    elif scene.shape == "star":
        vx, vy = _regular_vertices(scene.cx, scene.cy + 0.05 * r, r * 1.05, 5, inner=0.45 * r)
        inside = _polygon_inside(px, py, vx, vy)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; shapes are {', '.join(SHAPES)}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3)).astype(np.float32)


def background_image(scene: Scene, size: int = RESOLUTION) -> np.ndarray:
    """(size, size, 3) float32: a flat color, or the scene's vertical gradient."""
    if not scene.scene:
        return np.broadcast_to(np.asarray(COLORS[scene.background], np.float32), (size, size, 3)).copy()
    top, bottom, _ = SCENES[scene.background]
    w = ((np.arange(size) + 0.5) / size).astype(np.float32)[:, None, None]
    col = (1 - w) * np.asarray(top, np.float32) + w * np.asarray(bottom, np.float32)
    return np.broadcast_to(col, (size, size, 3)).copy()


def render(scene: Scene, size: int = RESOLUTION, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 1]."""
    alpha = coverage(scene, size, supersample)[..., None]
    fg = np.asarray(COLORS[scene.color], np.float32)
    return (1 - alpha) * background_image(scene, size) + alpha * fg


def images(scenes: list[Scene], size: int = RESOLUTION, supersample: int = 4) -> torch.Tensor:
    """The scenes rendered as one (n, 3, size, size) float32 batch in [0, 1], contiguous."""
    arr = np.stack([render(s, size, supersample) for s in scenes]) if scenes else np.zeros((0, size, size, 3),
                                                                                            np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def generate(n: int, seed: int, size: int = RESOLUTION, supersample: int = 4
             ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n images (n, 3, size, size) float32 in [0, 1], their captions and scenes; a pure function
    of (n, seed, size, supersample)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, size) for _ in range(n)]
    return images(scenes, size, supersample), [s.caption for s in scenes], scenes


def all_captions(positioned: bool = True) -> list[str]:
    """Every caption the world can produce (with `positioned=False`: only those that leave the
    position free)."""
    cells = [(1, 1, False)] + ([(r, c, True) for r, c in POSITIONS] if positioned else [])
    out = []
    for shape in SHAPES:
        for color in COLORS:
            for r, c, named in cells:
                out += [Scene(shape, color, bg, 0, 0, 1, False, r, c, named).caption for bg in COLORS if bg != color]
                out += [Scene(shape, color, sc, 0, 0, 1, True, r, c, named).caption
                        for sc, (_, _, no) in SCENES.items() if color not in no]
    return out


def vocabulary() -> tuple[str, ...]:
    """The words captions use: the tiny tokenizer's and the position words."""
    from ..models.load import TINY_SD_WORDS

    return tuple(TINY_SD_WORDS) + tuple(w for w in POSITION_WORDS if w not in TINY_SD_WORDS)


def tokenizer():
    """The CLIP tokenizer of the world's vocabulary (each caption word one token), which the
    shipped pipeline carries."""
    from ..models.load import build_tiny_tokenizer

    return build_tiny_tokenizer(vocabulary())
