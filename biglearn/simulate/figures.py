"""PNG figures of the simulations, drawn with PIL (no plotting library needed).

fit_panels:  one panel per seed: the data modes (grey discs of radius `radius`, the coverage
             test) and the model's components (2-sigma ellipses, red means); covered modes are
             outlined in green.
heat_maps:   one panel per objective over a 2-D parameter grid (darker = lower), with marked
             points and descent paths.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (150, 150, 150), (225, 225, 225)
RED, GREEN, BLUE, ORANGE = (200, 30, 30), (20, 150, 40), (30, 80, 200), (240, 140, 0)
# Low -> high: dark blue, teal, yellow (a short viridis-like ramp).
RAMP = np.array([[40, 20, 90], [40, 110, 140], [60, 180, 110], [250, 230, 60]], dtype=np.float64)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def fit_panels(
    path: Path,
    modes: np.ndarray,
    runs: list[dict],
    radius: float,
    title: str,
    extent: float = 6.0,
    size: int = 300,
) -> None:
    """runs: dicts with seed, means [K, 2], covs [K, 2, 2], covered_modes (indices), modes_covered."""
    pad, head = 10, 44
    width = len(runs) * (size + pad) + pad
    image = Image.new("RGB", (width, size + head + pad), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 4), title, fill=BLACK, font=_font(14))
    legend = f"grey discs: data modes (radius {radius:g}; green rim = covered); blue: model 2-sigma ellipses; red: model means"
    draw.text((pad, 23), legend, fill=GREY, font=_font(11))
    scale = size / (2 * extent)
    for index, run in enumerate(runs):
        left, top = pad + index * (size + pad), head

        def px(x: float, y: float) -> tuple[float, float]:
            return left + (x + extent) * scale, top + (extent - y) * scale

        draw.rectangle([left, top, left + size, top + size], outline=GREY)
        covered = set(run["covered_modes"])
        for j, (mx, my) in enumerate(modes):
            cx, cy = px(mx, my)
            r = radius * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=LIGHT, outline=GREEN if j in covered else GREY, width=2)
        for mean, cov in zip(np.asarray(run["means"]), np.asarray(run["covs"])):
            chol = np.linalg.cholesky(cov + 1e-12 * np.eye(2))
            angles = np.linspace(0, 2 * math.pi, 48)
            ring = mean[:, None] + 2 * chol @ np.stack([np.cos(angles), np.sin(angles)])
            draw.line([px(x, y) for x, y in ring.T] + [px(*ring[:, 0])], fill=BLUE, width=1)
            cx, cy = px(*mean)
            draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=RED)
        label = f"seed {run['seed']}: {run['modes_covered']}/{len(modes)} modes"
        draw.text((left + 4, top + 4), label, fill=BLACK, font=_font(12))
    _save(image, path)


def heat_maps(
    path: Path,
    panels: list[dict],
    low: float,
    high: float,
    marks: list[tuple[float, float]],
    title: str,
    size: int = 280,
) -> None:
    """panels: dicts with name, values [G, G] (rows = first parameter), and optional paths
    (lists of (p1, p2) points; start marked orange, end marked blue). Each panel is coloured on
    its own range with a square-root stretch; marks are drawn as red crosses."""
    pad, head, foot = 12, 44, 20
    width = len(panels) * (size + pad) + pad
    image = Image.new("RGB", (width, size + head + foot + pad), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 4), title, fill=BLACK, font=_font(14))
    for index, panel in enumerate(panels):
        left, top = pad + index * (size + pad), head
        values = np.asarray(panel["values"], dtype=np.float64)
        lo, hi = values.min(), values.max()
        level = np.sqrt(np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1))
        # rows = first parameter (x axis), columns = second (y axis, up): transpose and flip
        pixels = _ramp(level.T[::-1])
        tile = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
        image.paste(tile, (left, top))

        def px(p1: float, p2: float) -> tuple[float, float]:
            return left + (p1 - low) / (high - low) * size, top + (high - p2) / (high - low) * size

        for p1, p2 in marks:
            x, y = px(p1, p2)
            draw.line([x - 6, y - 6, x + 6, y + 6], fill=RED, width=2)
            draw.line([x - 6, y + 6, x + 6, y - 6], fill=RED, width=2)
        for trace in panel.get("paths", []):
            points = [px(*p) for p in trace]
            if len(points) > 1:
                draw.line(points, fill=WHITE, width=2)
            (sx, sy), (ex, ey) = points[0], points[-1]
            draw.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], fill=ORANGE)
            draw.ellipse([ex - 4, ey - 4, ex + 4, ey + 4], fill=BLUE, outline=WHITE)
        draw.text((left + 4, top + 4), panel["name"], fill=WHITE, font=_font(12))
        draw.text(
            (left, top + size + 3),
            f"{lo:.3f} .. {hi:.3f} nats; axes mu1, mu2 in [{low:g}, {high:g}]",
            fill=BLACK,
            font=_font(11),
        )
    _save(image, path)


def _ramp(level: np.ndarray) -> np.ndarray:
    position = level * (len(RAMP) - 1)
    below = np.clip(np.floor(position).astype(int), 0, len(RAMP) - 2)
    frac = (position - below)[..., None]
    colours = RAMP[below] * (1 - frac) + RAMP[below + 1] * frac
    return colours.round().astype(np.uint8)


def _save(image: Image.Image, path: Path) -> None:
    """Write to a temporary name, then rename: a reader never sees half a PNG."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.replace(path)
