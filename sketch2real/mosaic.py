"""Image grids (mosaics) with optional row labels."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(rows: Sequence[Sequence[Image.Image | None]], cell: int, labels: Sequence[str] | None = None,
               label_width: int = 0, background: str = "white") -> Image.Image:
    """Paste rows of images (None leaves a blank cell) into one grid of `cell`-pixel squares."""
    columns = max((len(r) for r in rows), default=0)
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), background)
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        if labels and label_width:
            draw.text((4, y * cell + cell // 2 - 5), labels[y][: max(1, label_width // 6)], fill="black")
        for x, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + x * cell, y * cell))
    return grid
