"""Spherical projection of a LiDAR sweep into the 5-channel range image of RangeViT (Ando et
al., CVPR 2023, arXiv 2301.10222), the LiDAR encoder mPnP-LLM (arXiv 2312.07886) uses."""

from __future__ import annotations

import numpy as np

#: Normalisation constants: (range, x, y, z, intensity) -> roughly unit scale.
RANGE_MEAN = np.array([12.0, 0.0, 0.0, -1.0, 0.2], dtype=np.float32)
RANGE_STD = np.array([12.0, 12.0, 12.0, 1.5, 0.3], dtype=np.float32)


def range_image_pixels(xyz: np.ndarray, distance: np.ndarray, beams: int, width: int,
                       fov_up_deg: float = 10.0, fov_down_deg: float = -30.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The range-image row and column of each point ``xyz (N, 3)`` at ``distance`` (> 0),
    floored and *not* bounded (rows outside the field of view fall outside ``0..beams-1``;
    a point exactly behind can reach column ``width``): callers bound them as they need."""
    fov_up, fov_down = np.radians(fov_up_deg), np.radians(fov_down_deg)
    pitch = np.arcsin(np.clip(xyz[:, 2] / distance, -1.0, 1.0))
    yaw = np.arctan2(xyz[:, 1], xyz[:, 0])
    row = np.floor((fov_up - pitch) / (fov_up - fov_down) * beams).astype(np.int64)
    col = np.floor(0.5 * (1.0 - yaw / np.pi) * width).astype(np.int64)
    return row, col


def points_to_range_image(
    points: np.ndarray,
    beams: int = 32,
    width: int = 2048,
    fov_up_deg: float = 10.0,
    fov_down_deg: float = -30.0,
    normalize: bool = True,
) -> np.ndarray:
    """Project points ``(N, 4)`` (x, y, z, intensity) to a ``(5, beams, width)`` image.

    Channels are range, x, y, z, intensity. Each pixel keeps its nearest point; empty pixels
    are 0 before normalisation and exactly 0 after it (they carry a separate meaning from
    any real return, which the normalised values of real points almost never hit).
    Row 0 is the top beam (+``fov_up_deg``), column 0 looks backwards and columns advance
    counter-clockwise, as in the usual KITTI/RangeNet convention.
    """
    if points.ndim != 2 or points.shape[1] < 4:
        raise ValueError(f"points must be (N, >=4), got {points.shape}")
    if beams < 1 or width < 1:
        raise ValueError("beams and width must be positive")
    pts = np.asarray(points[:, :4], dtype=np.float32)
    image = np.zeros((5, beams, width), dtype=np.float32)
    if len(pts) == 0:
        return image
    x, y, z, intensity = pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3]
    rng = np.sqrt(x * x + y * y + z * z)
    valid = rng > 1e-3
    x, y, z, intensity, rng = x[valid], y[valid], z[valid], intensity[valid], rng[valid]
    row, col = range_image_pixels(np.stack([x, y, z], axis=1), rng, beams, width, fov_up_deg,
                                  fov_down_deg)
    keep = (row >= 0) & (row < beams)
    row, col = row[keep], np.clip(col[keep], 0, width - 1)
    values = np.stack([rng, x, y, z, intensity])[:, keep]
    # Write far points first so the nearest return wins each pixel.
    order = np.argsort(-values[0])
    row, col, values = row[order], col[order], values[:, order]
    image[:, row, col] = values
    if normalize:
        filled = image[0] > 0
        image = (image - RANGE_MEAN[:, None, None]) / RANGE_STD[:, None, None]
        image *= filled[None]
    return image.astype(np.float32)
