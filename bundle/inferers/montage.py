"""A PNG montage of the prompted slices with the mask and the prompt drawn over them, for a quick look."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle.io import atomic_write


def write_montage(
    volume: np.ndarray, mask: np.ndarray, slices, path: Path, transpose: bool = False, max_panels: int = 16
) -> Path:
    """Draw up to ``max_panels`` of the prompted ``slices`` (evenly chosen) of ``volume [A, B, K]`` (or
    ``[3, A, B, K]``, intensities in [0, 255]) with ``mask [A, B, K]`` (bool in red; a label map one colour per label),
    boxes in yellow (cyan when propagated) and clicks (green foreground, red background). Shown as the network sees
    them (rows = array axis a unless ``transpose``); a slice prompted for several objects is drawn once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    slices = list({s.index: s for s in slices}.values())
    if len(slices) > max_panels:
        picks = np.linspace(0, len(slices) - 1, max_panels).round().astype(int)
        slices = [slices[i] for i in sorted(set(picks))]
    n = max(1, len(slices))
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), slices):
        image = volume[..., s.index]
        if image.ndim == 3:  # [3, A, B] -> [A, B, 3]
            image = np.clip(np.moveaxis(image, 0, -1), 0, 255).astype(np.uint8)
        m = mask[..., s.index]

        def view(a):
            return np.swapaxes(a, 0, 1) if transpose else a

        ax.imshow(view(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        overlay = np.zeros(view(m).shape + (4,))
        if m.dtype == bool:
            overlay[view(m)] = (1, 0, 0, 0.4)
        else:
            colours = plt.get_cmap("tab10")
            for value in np.unique(m[m > 0]):
                overlay[view(m == value)] = (*colours(int(value - 1) % 10)[:3], 0.45)
        ax.imshow(overlay, interpolation="nearest")
        if s.box is not None:
            a0, b0, a1, b1 = s.box
            x0, y0, x1, y1 = (a0, b0, a1, b1) if transpose else (b0, a0, b1, a1)
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5),
                    x1 - x0 + 1,
                    y1 - y0 + 1,
                    fill=False,
                    lw=1,
                    ec="cyan" if s.propagated else "yellow",
                )
            )
        for (a, b), label in zip(s.points, s.labels):
            x, y = (a, b) if transpose else (b, a)
            ax.plot(x, y, marker="*", ms=9, color="lime" if label == 1 else "red", mec="black")
        state = f"stopped, {s.stopped}" if s.stopped else f"{int((m > 0).sum())} px"
        ax.set_title(f"slice {s.index}{' (prop.)' if s.propagated else ''}: {state}", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path
