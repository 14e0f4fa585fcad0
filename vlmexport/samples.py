"""Deterministic sample images: coloured shapes (the example's domain) and varied textures.

They are drawn in code rather than shipped as files so the set is reproducible
and reviewable; `check` and `merge` use them when no --images folder is given.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def shape_caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def draw_shape(color: str, shape: str, background: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One shape of random size and position, lightly jittered colours, on a plain background."""

    def jitter(rgb: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)

    image = Image.new("RGB", (size, size), jitter(COLORS[background]))
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.35, 0.7) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = jitter(COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def random_shape(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    color, background = rng.sample(sorted(COLORS), 2)
    shape = rng.choice(SHAPES)
    return draw_shape(color, shape, background, rng, size), shape_caption(color, shape, background)


def sample_images(count: int = 4, size: int = 224, seed: int = 0, fixed: bool = True) -> list[Image.Image]:
    """Varied, non-blank, pairwise distinct images: shapes alternating with textures — a gradient,
    noise and stripes first (unless not `fixed`: the gradient and stripes are the same for every
    seed), then textures of random kind, colours and scale."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1)
    stripes = ((np.arange(size)[:, None] // 8 + np.arange(size)[None, :] // 8) % 2 * 200 + 30).astype(np.float32)
    textures = [
        Image.fromarray(gradient.astype(np.uint8)),
        Image.fromarray(np_rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        Image.fromarray(np.stack([stripes, stripes[::-1], 255 - stripes], -1).astype(np.uint8)),
    ]
    images: list[Image.Image] = []
    while len(images) < count:
        i = len(images)
        if i % 2 == 0:
            images.append(random_shape(rng, size)[0])
        else:
            # Beyond the first three textures, new ones: a fidelity mean over many images must
            # not count the same three pictures again and again (it did: 48 of 96 were copies).
            images.append(textures[i // 2] if fixed and i // 2 < len(textures) else random_texture(np_rng, size))
    return images


def random_texture(np_rng: np.random.Generator, size: int) -> Image.Image:
    """A gradient, blocky noise or stripes with random colours, direction and scale."""
    return captioned_texture(np_rng, size)[0]


def captioned_texture(np_rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """`random_texture` and its caption ("red and blue stripes"), colours named by the nearest of
    COLORS: what the real-weights preset's projection is trained on besides the shapes."""
    kind = int(np_rng.integers(3))
    low, high = np_rng.integers(0, 256, 3).astype(np.float32), np_rng.integers(0, 256, 3).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # linear gradient between two colours, any direction
        angle = np_rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # noise in square cells of 1 to 16 pixels
        cell = int(np_rng.integers(1, 17))
        cells = np_rng.random(((size + cell - 1) // cell,) * 2)
        t = np.kron(cells, np.ones((cell, cell)))[:size, :size]
    else:  # stripes of random period and direction, two colours
        period = int(np_rng.integers(4, 33))
        t = ((np.arange(size)[:, None] * np_rng.integers(0, 2) + np.arange(size)[None, :]) // period % 2).astype(np.float32)
    pixels = low + (high - low) * t[..., None]
    first, second = color_name(low), color_name(high)
    pattern = ("a gradient", "noise", "stripes")[kind]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), f"{pattern} of {first} and {second}"


def color_name(rgb: np.ndarray) -> str:
    """The name in COLORS nearest to `rgb`."""
    return min(COLORS, key=lambda name: float(((np.array(COLORS[name], np.float32) - rgb) ** 2).sum()))
