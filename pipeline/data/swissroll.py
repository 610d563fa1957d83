"""The paper's toy data: the swiss roll, as a 2-D curve and as the authors' 3-D sheet.

Both come from scikit-learn's `make_swiss_roll`, which draws the roll parameter t uniformly
from [1.5π, 4.5π] and a height h uniformly from [0, 21]; the roll is (t·cos t, h, t·sin t).

- `swissroll` (2-D): the roll seen along its axis, (x, z) / 10, no noise: a 1-D spiral curve
  in about [-1, 1.5]². This is the project's original toy set.
- `swissroll3d`: the authors' toy set (gengcong940126/AGE `src/utils.py`): noise 0.05, the
  height shifted and halved to make the sheet thinner, then every axis shifted to start at 0,
  divided by the largest axis range and mapped to [-1, 1]: a 2-D sheet in 3-D. The authors
  scale by the ranges of the drawn sample; here by the ranges of the noise-free roll, so that
  training and held-out sets share one coordinate system.

`RollGeometry.locate` projects points onto the noise-free roll, giving each point's roll
parameter and its distance from the roll. That is what the coverage metrics measure
(`roll_coverage`): does a sampler put points on the roll (distance), and along the whole roll
in the data's proportions (histogram over t)?
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

T_MIN, T_MAX = 1.5 * math.pi, 4.5 * math.pi  # scikit-learn's range of the roll parameter
HEIGHT_MAX = 21.0  # scikit-learn's heights are uniform on [0, 21]
SCALE_2D = 10.0  # brings the 2-D roll (radius up to ~14) to roughly [-1, 1.5]
NOISE_3D = 0.05  # the authors' noise (in scikit-learn's units)
ROLL_BINS = 20  # bins of the roll-parameter histogram in the coverage metric
OFF_ROLL_DISTANCE = 0.05  # a sample farther than this from the roll (in data coordinates) is off it


def _curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return t * np.cos(t), t * np.sin(t)


def _axis_ranges_3d() -> tuple[np.ndarray, float]:
    """Per-axis minimum and the common scale of the authors' normalisation, for the
    noise-free roll (x, thinned height, z)."""
    t = np.linspace(T_MIN, T_MAX, 200_001)
    x, z = _curve(t)
    height = np.array([(0.0 - 10.0) * 0.5, (HEIGHT_MAX - 10.0) * 0.5])
    minimum = np.array([x.min(), height.min(), z.min()])
    maximum = np.array([x.max(), height.max(), z.max()])
    return minimum, 1.0 / float((maximum - minimum).max())


@dataclass(frozen=True)
class RollGeometry:
    """One kind of roll: how to draw points and how to locate points relative to it."""

    kind: str  # "swissroll" or "swissroll3d"

    @property
    def dimension(self) -> int:
        return 2 if self.kind == "swissroll" else 3

    def sample(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """`count` points of the roll (float32, data coordinates) and their roll parameters t."""
        from sklearn.datasets import make_swiss_roll

        noise = 0.0 if self.kind == "swissroll" else NOISE_3D
        points, t = make_swiss_roll(n_samples=count, noise=noise, random_state=seed)
        return torch.from_numpy(self.from_sklearn(points).astype(np.float32)), torch.from_numpy(t)

    def from_sklearn(self, points: np.ndarray) -> np.ndarray:
        if self.kind == "swissroll":
            return points[:, [0, 2]] / SCALE_2D
        thinned = points.copy()
        thinned[:, 1] = (thinned[:, 1] - 10.0) * 0.5
        minimum, scale = _axis_ranges_3d()
        return ((thinned - minimum) * scale - 0.5) / 0.5

    def locate(self, points: Tensor, resolution: int = 20_000) -> tuple[Tensor, Tensor]:
        """(roll parameter t of the nearest roll point, distance to it) for each point, in the
        data coordinates of this roll. The roll is sampled at `resolution` values of t: finer
        than 0.5% of the distance between two turns."""
        t_grid = np.linspace(T_MIN, T_MAX, resolution)
        x, z = _curve(t_grid)
        points = points.double()
        if self.kind == "swissroll":
            curve = torch.from_numpy(np.stack([x, z], 1) / SCALE_2D)
            planar, height_excess = points, torch.zeros(len(points), dtype=torch.float64)
        else:
            minimum, scale = _axis_ranges_3d()
            to_data = lambda values, axis: ((values - minimum[axis]) * scale - 0.5) / 0.5  # noqa: E731
            curve = torch.from_numpy(np.stack([to_data(x, 0), to_data(z, 2)], 1))
            planar = points[:, [0, 2]]
            low, high = to_data(-5.0, 1), to_data(0.5 * (HEIGHT_MAX - 10.0), 1)
            height = points[:, 1]
            height_excess = (low - height).clamp(min=0) + (height - high).clamp(min=0)
        nearest_t, planar_distance = [], []
        for chunk in planar.split(2048):  # bounded memory: 2048 × resolution distances at a time
            distances = torch.cdist(chunk, curve)
            best = distances.min(dim=1)
            nearest_t.append(torch.from_numpy(t_grid)[best.indices])
            planar_distance.append(best.values)
        distance = torch.sqrt(torch.cat(planar_distance).pow(2) + height_excess.pow(2))
        return torch.cat(nearest_t), distance


def roll_geometry(kind: str) -> RollGeometry:
    if kind not in ("swissroll", "swissroll3d"):
        raise ValueError(f"unknown roll {kind!r}: expected 'swissroll' or 'swissroll3d'")
    return RollGeometry(kind)


def roll_coverage(samples: Tensor, geometry: RollGeometry) -> dict[str, float]:
    """Coverage of the roll by generated `samples`.

    - `roll_parameter_tv`: total variation distance between the samples' histogram over the
      roll parameter of their nearest roll point (`ROLL_BINS` equal bins of [1.5π, 4.5π]) and
      the data's, which is uniform in t. 0 is perfect; an ideal sampler of 5000 points scores
      about 0.025 (sampling noise); one that never reaches the inner third of the roll, 0.33.
    - `off_roll_fraction`: the share of samples farther than `OFF_ROLL_DISTANCE` from the roll.
    """
    t, distance = geometry.locate(samples)
    counts = torch.histc(t, bins=ROLL_BINS, min=T_MIN, max=T_MAX)
    proportions = counts / counts.sum()
    total_variation = 0.5 * (proportions - 1.0 / ROLL_BINS).abs().sum().item()
    return {"roll_parameter_tv": total_variation,
            "off_roll_fraction": (distance > OFF_ROLL_DISTANCE).double().mean().item()}
