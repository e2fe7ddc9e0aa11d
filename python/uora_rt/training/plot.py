"""The loss-curve picture `uora-rt train` writes beside the adapter (matplotlib, no display)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def save_loss_curve(result, path, title: str = "") -> None:
    """Training loss per step (and its running mean), evaluation loss after each epoch, reinit
    events as ticks. Written atomically, like the adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(result.losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, result.losses, color="#9ecae1", lw=0.8, label="train loss (per step)")
    window = max(1, len(steps) // 20)
    if window > 1:
        run = [sum(result.losses[max(0, i - window + 1): i + 1]) / (i - max(0, i - window + 1) + 1)
               for i in range(len(steps))]
        ax.plot(steps, run, color="#08519c", lw=1.5, label=f"train loss ({window}-step mean)")
    if result.evals:
        ax.plot([e["step"] for e in result.evals], [e["loss"] for e in result.evals], "o-",
                color="#d94801", label="eval loss")
    fired = [s for s, n in zip(steps, result.reinit) if n]
    if fired:
        lo = min(result.losses)
        ax.plot(fired, [lo] * len(fired), "|", color="#238b45", ms=10,
                label=f"reinit events ({sum(result.reinit)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".png.tmp")
    # mkstemp makes the file 0600; the picture gets what a plain open() would give it.
    umask = os.umask(0o077)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
