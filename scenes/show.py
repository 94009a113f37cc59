"""A picture of one frame: six camera views, LiDAR bird's-eye view, range image, questions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scenes.range_image import points_to_range_image
from scenes.sample import CAMERA_VIEWS, Frame, QAItem

#: Views laid out as the car sees them: front row left-to-right, back row left-to-right.
_GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
         ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))


def render_frame_png(frame: Frame, questions: list[QAItem], out: str | Path,
                     bev_range: float = 40.0) -> Path:
    """Write a PNG summarising ``frame`` and its questions; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(15, 10.5))
    grid = fig.add_gridspec(5, 6, height_ratios=[1, 1, 0.55, 1.6, 0.2])
    for r, row in enumerate(_GRID):
        for c, view in enumerate(row):
            ax = fig.add_subplot(grid[r, 2 * c:2 * c + 2])
            ax.imshow(frame.cameras[view], interpolation="nearest")
            ax.set_title(view, fontsize=8)
            ax.axis("off")
    rimg = points_to_range_image(frame.lidar, beams=32, width=max(512, _width_of(frame)),
                                 normalize=False)
    ax = fig.add_subplot(grid[2, :])
    ax.imshow(np.where(rimg[0] > 0, rimg[0], np.nan), aspect="auto", cmap="turbo",
              interpolation="nearest")
    ax.set_title("LiDAR range image (range channel, 32 beams)", fontsize=8)
    ax.axis("off")
    ax = fig.add_subplot(grid[3, :2])
    pts = frame.lidar
    near = (np.abs(pts[:, 0]) < bev_range) & (np.abs(pts[:, 1]) < bev_range)
    ax.scatter(-pts[near, 1], pts[near, 0], s=0.3, c=pts[near, 3], cmap="viridis",
               vmin=0, vmax=0.6)
    for obj in frame.objects or []:
        _draw_box(ax, obj)
    if "radar" in frame.sensors:  # returns as magenta dots, radial velocity as arrows
        from scenes.radar import all_returns

        ret = all_returns(frame.sensors["radar"])
        if len(ret):
            rng = np.maximum(np.hypot(ret[:, 0], ret[:, 1]), 1e-6)
            ax.scatter(-ret[:, 1], ret[:, 0], s=6, c="magenta", marker="o")
            ax.quiver(-ret[:, 1], ret[:, 0], -ret[:, 1] / rng * ret[:, 3],
                      ret[:, 0] / rng * ret[:, 3], color="magenta", angles="xy",
                      scale_units="xy", scale=1.0, width=0.003)
    ax.set_xlim(-bev_range, bev_range)
    ax.set_ylim(-bev_range, bev_range)
    ax.set_aspect("equal")
    ax.set_title("LiDAR bird's-eye view (up = front, colour = intensity); radar in magenta, "
                 "arrows = radial velocity", fontsize=8)
    ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid[3, 2:])
    ax.axis("off")
    lines = [f"{q.template_type} H{q.num_hop}: {q.question}  ->  {q.answer}" for q in questions]
    ax.text(0, 1, "\n".join(lines) or "(no questions)", va="top", fontsize=7.5, family="monospace",
            wrap=True)
    fig.suptitle(f"{frame.frame_id}  scene {frame.scene_id}  light {frame.light:.2f} "
                 f"({'night' if frame.is_night else 'day'})  objects "
                 f"{len(frame.objects or [])}  lidar points {len(frame.lidar)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _width_of(frame: Frame) -> int:
    return 512 if len(frame.lidar) < 40000 else 2048


def _draw_box(ax, obj) -> None:
    cx, cy = obj.center[0], obj.center[1]
    w, length = obj.size[0], obj.size[1]
    c, s = np.cos(obj.yaw), np.sin(obj.yaw)
    corners = np.array([[length, w], [length, -w], [-length, -w], [-length, w], [length, w]]) / 2
    xs = cx + corners[:, 0] * c - corners[:, 1] * s
    ys = cy + corners[:, 0] * s + corners[:, 1] * c
    ax.plot(-ys, xs, lw=0.8, color="red")
    ax.text(-cy, cx, obj.category[:5], fontsize=5, color="black")


__all__ = ["render_frame_png", "CAMERA_VIEWS"]
