"""Connected regions of a boolean map (numpy only): the one flood fill behind the FCN's region box
(utils/analysis/fcn.py) and explain.py's hottest-region box (utils/explain/geometry.py). Written here rather than
imported because scipy.ndimage (the usual `label`) is not a dependency of the toolkit and the maps are small."""

from __future__ import annotations

import numpy as np

_STEPS4 = ((1, 0), (-1, 0), (0, 1), (0, -1))
_STEPS8 = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def component(mask: np.ndarray, seed: tuple[int, int], diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the region of True cells holding `seed` (row, col); 8-connected with `diagonal`,
    else 4-connected. The seed itself is included even where the mask is False."""
    steps = _STEPS8 if diagonal else _STEPS4
    seen = np.zeros(mask.shape, dtype=bool)
    seen[seed] = True
    stack, ys, xs = [seed], [seed[0]], [seed[1]]
    while stack:
        y, x = stack.pop()
        for dy, dx in steps:
            ny, nx = y + dy, x + dx
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                stack.append((ny, nx))
                ys.append(ny)
                xs.append(nx)
    return np.asarray(ys), np.asarray(xs)


def largest_component(mask: np.ndarray, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the largest region of True cells (the first found on a tie; empty for an empty mask)."""
    left = mask.copy()
    best = (np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    while left.any():
        seed = tuple(int(v) for v in np.argwhere(left)[0])
        ys, xs = component(left, seed, diagonal)
        left[ys, xs] = False
        if len(ys) > len(best[0]):
            best = (ys, xs)
    return best
