"""The figures the jobs log: training curves, scores against the number of edits, and the whole-number step
axis they share. Only matplotlib (imported when drawing), so light jobs such as compare can use it."""

from __future__ import annotations

import re
from typing import Any

LOSS_KEYS = ("train/gen_loss", "train/loc_loss", "train/cache_loss")


def integer_steps(axis: Any) -> None:
    """Whole-number ticks on an x axis that counts steps or edits (matplotlib would put 2.5 between 2 and 3)."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_histories(history: dict[str, list[tuple[int, float]]]) -> Any:
    """Training losses (left) and the eval metrics logged during training (right) against the step."""
    losses = {k: v for k, v in history.items() if k in LOSS_KEYS and v}
    evals = {
        k: v
        for k, v in history.items()
        if re.fullmatch(r"eval/(edited|unedited)/(ES|GS|LS|loc_agreement)", k)
    }
    if not losses and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(losses.items()):
        left.plot([s for s, _ in points], [v for _, v in points], marker=".", label=key)
    left.set(xlabel="meta-step", ylabel="loss per edit", title="training losses")
    for key, points in sorted(evals.items()):
        style = "--" if "/unedited/" in key else "-"
        right.plot([s for s, _ in points], [v for _, v in points], style, marker="o", label=key[5:])
    right.set(xlabel="meta-step", ylabel="accuracy", title="evaluation", ylim=(-0.02, 1.02))
    for axis in (left, right):
        integer_steps(axis)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_vs_edits(rows: list[dict[str, float]], title: str = "") -> Any:
    """ES/GS/LS and the live scores (edited, and unedited dashed) against the number of edits, like the
    HORSE/MALMEN Fig. 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["n_edits"])
    x = [r["n_edits"] for r in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    curves = ("ES", "GS", "LS", "loc_agreement", "live_ES", "live_GS", "loc_gen_same")
    for metric, colour in zip(curves, (f"C{i}" for i in range(len(curves)))):
        if all(f"edited/{metric}" in r for r in rows):
            axis.plot(x, [r[f"edited/{metric}"] for r in rows], "-o", color=colour, label=metric)
        if all(f"unedited/{metric}" in r for r in rows):
            axis.plot(x, [r[f"unedited/{metric}"] for r in rows], "--", color=colour, alpha=0.5)
    axis.set_xscale("log", base=2)
    axis.set(
        xlabel="number of edits",
        ylabel="accuracy",
        ylim=(-0.02, 1.02),
        title=title or "edited (—) / unedited (--)",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
