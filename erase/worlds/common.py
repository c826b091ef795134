"""What every world's evaluation writes the same way: the report's file names, image differences and the
base-vs-erased grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["GRID_FILE", "REPORT_FILE", "mean_pixel_difference", "save_comparison_grid"]

#: Files an evaluation writes into its output folder.
REPORT_FILE = "eval.json"
GRID_FILE = "eval_grid.png"


def mean_pixel_difference(base: Sequence[np.ndarray], erased: Sequence[np.ndarray]) -> float:
    """Mean absolute difference (0..1) between paired uint8 images of the base and the erased model."""
    return float(
        np.mean([np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255 for a, b in zip(base, erased)])
    )


def save_comparison_grid(
    prompts: dict[str, list[str]], base: dict[str, list[np.ndarray]], erased: dict[str, list[np.ndarray]], path: Path
) -> None:
    """Base (top) vs erased (bottom), first seed, up to 12 prompts across the groups, captions above."""
    from PIL import Image, ImageDraw

    quota = {"erased": 4, "synonym": 2, "irrelevant": 3, "implicit": 3}
    chosen = [p for group, n in quota.items() for p in prompts.get(group, [])[:n]]
    chosen += [p for p in prompts["irrelevant"][quota["irrelevant"]:] if p not in chosen][: 12 - len(chosen)]
    cell, label = 96, 28
    grid = Image.new("RGB", (cell * len(chosen), label + 2 * cell + 14), "white")
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(chosen):
        x = i * cell
        caption = prompt or "(empty)"
        for j, line in enumerate((caption[:16], caption[16:32])):
            draw.text((x + 2, 2 + 12 * j), line, fill="black")
        grid.paste(Image.fromarray(base[prompt][0]).resize((cell, cell), Image.NEAREST), (x, label))
        grid.paste(Image.fromarray(erased[prompt][0]).resize((cell, cell), Image.NEAREST), (x, label + cell))
    draw.text((2, label + 2 * cell + 1), "top: base   bottom: erased (seed 0)", fill="black")
    grid.save(path)


