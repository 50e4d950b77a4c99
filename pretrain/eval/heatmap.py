"""The S-NIAH figure: an accuracy heatmap as a PNG (Pillow), laid out like the Titans / RULER needle figures.

Columns are context lengths (left to right, increasing), rows are needle depths (top: 0 %, the needle right after
the start; bottom: 100 %, right before the question). A cell's colour runs red (accuracy 0) through yellow (0.5)
to green (1) and carries its accuracy in % as text; the title names the task and whether test-time learning was on.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL_W, CELL_H, LEFT, TOP, BOTTOM = 64, 28, 72, 40, 44


def accuracy_colour(accuracy: float) -> tuple[int, int, int]:
    """Red (0) -> yellow (0.5) -> green (1), linear in each half."""
    a = min(max(accuracy, 0.0), 1.0)
    red, green = (214, 48, 39), (26, 152, 80)
    yellow = (254, 224, 100)
    lo, hi, t = (red, yellow, 2 * a) if a <= 0.5 else (yellow, green, 2 * a - 1)
    return tuple(round(x + (y - x) * t) for x, y in zip(lo, hi))


def cell_box(row: int, column: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of the cell at depth row `row`, length column `column`."""
    x0, y0 = LEFT + column * CELL_W, TOP + row * CELL_H
    return x0, y0, x0 + CELL_W - 1, y0 + CELL_H - 1


def write_heatmap(path: str | Path, accuracy: dict[tuple[float, int], float], title: str) -> Path:
    """Write the heatmap of accuracy {(depth %, length): accuracy in [0, 1]} (a full grid) to `path` (PNG)."""
    depths = sorted({d for d, _ in accuracy})
    lengths = sorted({n for _, n in accuracy})
    font = ImageFont.load_default()
    axis = "context length (tokens)  /  needle depth (rows)"
    text_width = max(font.getlength(t) for t in (title, axis))
    width = max(LEFT + CELL_W * len(lengths), LEFT + round(text_width)) + 16
    height = TOP + CELL_H * len(depths) + BOTTOM
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 12), title, fill="black", font=font)
    for r, depth in enumerate(depths):
        x0, y0, _, y1 = cell_box(r, 0)
        draw.text((x0 - 8, (y0 + y1) / 2), f"{depth:g}%", fill="black", font=font, anchor="rm")
        for c, length in enumerate(lengths):
            box = cell_box(r, c)
            draw.rectangle(box, fill=accuracy_colour(accuracy[depth, length]), outline="white")
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{100 * accuracy[depth, length]:.0f}",
                      fill="black", font=font, anchor="mm")
    y = TOP + CELL_H * len(depths) + 4
    for c, length in enumerate(lengths):
        x0, _, x1, _ = cell_box(0, c)
        draw.text(((x0 + x1) / 2, y), str(length), fill="black", font=font, anchor="ma")
    draw.text((LEFT, y + 18), axis, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
