"""The report's pictures, drawn with matplotlib: plot_rrr (rrr.py's plot.png, three titled panels) and
plot_rerest (Re-ReST's table as bars). matplotlib is imported when a picture is drawn, not before.
"""

import math
import os
from pathlib import Path

from runs import require

# --- plots (matplotlib) ----------------------------------------------------------------------------------

# Fixed sizes, so that every report's picture is the same number of pixels (figsize in inches x PLOT_DPI).
PLOT_DPI = 100
RRR_FIGSIZE = (15.0, 4.5)       # 1500 x 450: three panels side by side
REREST_FIGSIZE = (10.0, 5.0)    # 1000 x 500


def _figure(figsize):
    """A matplotlib Figure drawn by the Agg canvas. pyplot is not used: it keeps global state and picks a
    GUI backend, neither of which a training script wants; importing here keeps matplotlib optional
    until a report is written."""
    require("matplotlib", "pip install matplotlib", "writing the report's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path):
    """Writes the PNG through a temporary name, so that a crash never leaves a half-written plot."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    fig.savefig(tmp, format="png", dpi=PLOT_DPI)
    os.replace(tmp, path)


def _values(rows: list[dict], key: str) -> list[float]:
    """rows[i][key] as floats; a missing or None value becomes NaN, which matplotlib leaves as a gap."""
    return [math.nan if r.get(key) is None else float(r[key]) for r in rows]


def _no_data(ax, text: str):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=12)


def _steps_axis(ax, steps):
    """Whole-number ticks on a step axis; a single step gets a range around it (matplotlib would
    otherwise zoom into fractions of a step)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps and min(steps) == max(steps):
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def _legend(ax, *axes, below=True):
    """One legend for the lines of several axes (a twinx pair), below the panel so that it never covers a
    line (below=False: inside, where matplotlib finds room); none when nothing was drawn, which would
    otherwise make matplotlib warn."""
    handles = [h for a in (ax,) + axes for h in a.get_legend_handles_labels()[0]]
    if handles and below:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, frameon=False)
    elif handles:
        ax.legend(handles=handles, loc="best", fontsize=9)


def _two_lines(ax, x, under, over, under_label, over_label):
    """Two curves that may coincide: `under` wide and pale, `over` thin with open markers on top of it, so
    that both stay visible where they are equal; and a note when they are equal everywhere."""
    ax.plot(x, under, marker="s", ms=8, lw=5, alpha=0.35, color="C1", label=under_label)
    ax.plot(x, over, marker="o", ms=5, lw=1.5, mfc="none", color="C0", label=over_label)
    if under == over:
        ax.text(0.5, 0.93, "the two curves coincide", transform=ax.transAxes, ha="center", color="0.3", fontsize=9)


def plot_rrr(path: Path, metrics: list[dict], evals: list[dict], title: str | None = None):
    """RRR's plot.png, three panels: (a) mean reward and the fraction of zero-variance groups per training
    step (metrics' `step`, `reward`, `zero_variance_groups`); (b) first- and second-try test accuracy at
    each evaluation (evals' `step`, `first`, `second`, in [0, 1]); (c) KL to the initial model
    (`mean_kl`, left axis) and trained tokens per episode (`trained_length`, right axis) per step.
    Empty metrics (0 training steps) or evals leave a panel saying so."""
    from matplotlib.ticker import PercentFormatter
    fig = _figure(RRR_FIGSIZE)
    if title:
        fig.suptitle(title)
    a, b, c = fig.subplots(1, 3)
    steps = [m["step"] for m in metrics]
    for ax, at in ((a, steps), (b, [e["step"] for e in evals]), (c, steps)):
        _steps_axis(ax, at)
        ax.grid(alpha=0.3)
    # Markers, so that a run with a single step or evaluation still shows its point.
    if metrics:
        _two_lines(a, steps, _values(metrics, "zero_variance_groups"), _values(metrics, "reward"),
                   "zero-variance groups (no signal)", "mean reward (retry solved)")
    else:
        _no_data(a, "no training steps")
    a.set(title="(a) reward per training step", xlabel="training step", ylabel="fraction", ylim=(-0.03, 1.03))
    _legend(a)
    if evals:
        at = [e["step"] for e in evals]
        _two_lines(b, at, _values(evals, "second"), _values(evals, "first"), "second try (after reflection)", "first try")
        for k in range(2, len(evals[-1].get("tries", []))):       # rrr.py's --attempts > 2
            b.plot(at, [e["tries"][k] for e in evals], marker="^", ms=5, ls=":", color=f"C{k}", label=f"try {k + 1}")
    else:
        _no_data(b, "no evaluations")
    b.set(title="(b) test accuracy per evaluation", xlabel="training step", ylabel="accuracy", ylim=(-0.03, 1.03))
    b.yaxis.set_major_formatter(PercentFormatter(1.0))
    _legend(b)
    # KL and length have unrelated units: two y axes, each coloured like its line.
    c2 = c.twinx()
    if metrics:
        kl, length = _values(metrics, "mean_kl"), _values(metrics, "trained_length")
        c.plot(steps, kl, color="C0", marker="o", ms=3, label="mean KL to initial model")
        c2.plot(steps, length, color="C3", marker="s", ms=3, ls="--", label="trained tokens per episode")
        # Both are at least 0: axes from 0, and a constant 0 (beta = 0, or nothing updated) is said, not zoomed into.
        top_kl = max([v for v in kl if v == v] + [0.0])
        c.set_ylim(0, top_kl * 1.15 if top_kl > 0 else 1.0)
        c2.set_ylim(0, max([v for v in length if v == v] + [1.0]) * 1.15)
        if top_kl == 0:
            c.text(0.5, 0.93, "KL is 0 at every step", transform=c.transAxes, ha="center", color="C0", fontsize=9)
    else:
        _no_data(c, "no training steps")
    c.set(title="(c) KL and trained length per step", xlabel="training step")
    c.set_ylabel("mean KL (k3, per token)", color="C0")
    c2.set_ylabel("trained tokens per episode", color="C3")
    _legend(c, c2)
    _save(fig, path)


def plot_rerest(path: Path, rows: dict, sc: dict | None = None, title: str | None = None):
    """Re-ReST's table as bars: pass@1 per row ({row name: pass@1 in [0, 1], or None for a row without a
    score}) and, when given, the self-consistency pass@1 per row beside it. A None row has no bar and
    says "n/a" (a missing score, not a zero)."""
    import textwrap

    from matplotlib.ticker import PercentFormatter
    fig = _figure(REREST_FIGSIZE)
    ax = fig.subplots()
    names = list(rows)
    series = [("pass@1 (greedy)", rows)] + ([("self-consistency pass@1", sc)] if sc is not None else [])
    width = 0.8 / len(series)
    shown = [v for _, values in series for v in values.values() if v is not None]
    top = min(1.05, max([0.1] + shown) * 1.2)     # room above the tallest bar for its label
    for s, (label, values) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(names))]
        have = [(x, values.get(n)) for x, n in zip(xs, names) if values.get(n) is not None]
        bars = ax.bar([x for x, _ in have], [v for _, v in have], width * 0.95, color=f"C{s}", label=label)
        ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for _, v in have], fontsize=8, padding=2)
        for x, n in zip(xs, names):
            if values.get(n) is None:
                ax.text(x, top * 0.01, "n/a", ha="center", va="bottom", color="0.4", fontsize=9)
    ax.set_xticks(range(len(names)), [textwrap.fill(n, 16) for n in names], fontsize=9)
    ax.set(title=title or "Re-ReST: pass@1 on the test problems per row", xlabel="row of the report's table",
           ylabel="pass@1 (share of test problems solved)", ylim=(0, top),
           xlim=(-0.6, len(names) - 0.4))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, below=False)
    _save(fig, path)
