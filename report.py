"""The reports of rrr.py (whose table compare.py draws for several runs) and rerest.py, and what they rest
on: 95% Wilson intervals, exact McNemar tests of paired changes, markdown tables, and the pictures."""

import math
import os
from dataclasses import asdict
from pathlib import Path

from runs import EMBEDDED_MODEL, BadInput, read_jsonl, require, write_json

# --- statistics ----------------------------------------------------------------------------------------

Z95 = 1.959963984540054          # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n (Wilson 1927): unlike the normal approximation it
    stays inside [0, 1] and is not a single point at 0 or n."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else center - half, 1.0 if k == n else center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b items right only before, c right only after. With no change each
    of the b + c discordant items goes either way with probability 1/2, so this is the binomial test of b
    in b + c (the items both got right or both got wrong say nothing)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired_change(before: dict, after: dict) -> dict:
    """before, after: {item id: solved} on the same items. The change in accuracy, its exact McNemar test
    and a plain-words verdict at the 5% level."""
    if set(before) != set(after):
        raise ValueError("a paired test needs the same items before and after")
    b = sum(before[i] and not after[i] for i in before)
    c = sum(after[i] and not before[i] for i in before)
    p = mcnemar_exact(b, c)
    return dict(n=len(before), change=(c - b) / max(len(before), 1), lost=b, gained=c, p_value=p,
                verdict="significant at 5%" if p < 0.05 else "within noise (p >= 0.05)")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def with_interval(k: int, n: int) -> str:
    """'41.2% [30.1, 52.3]': a rate with its 95% Wilson interval, in percent."""
    lo, hi = wilson_interval(k, n)
    return f"{pct(k / n if n else None)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def change_text(change: dict) -> str:
    return (f"{100 * change['change']:+.1f} pts (gained {change['gained']}, lost {change['lost']}; "
            f"McNemar p = {change['p_value']:.3g}, {change['verdict']})")


def markdown_table(columns, rows: list[dict]) -> str:
    """The rows' cells under `columns`: a list of keys that are also the titles, or {key: title} where
    titles repeat (Re-ReST's "vs base")."""
    titles = columns if isinstance(columns, dict) else {c: c for c in columns}
    lines = ["| " + " | ".join(str(cell) for cell in cells) + " |"
             for cells in [titles.values()] + [[row[key] for key in titles] for row in rows]]
    lines.insert(1, "|" + "|".join("---" for _ in titles) + "|")
    return "\n".join(lines)


# --- rrr.py's report, and compare.py's table of several runs --------------------------------------------

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
CAPTION = ("Accuracy with its 95% Wilson interval; changes from the vanilla model on the same items with the "
           "exact McNemar test (only items one model solves and the other does not count).")


def try_name(k: int) -> str:
    return ORDINALS[k] if k < len(ORDINALS) else f"{k + 1}th"


def outcomes(rows: dict) -> dict:
    """{item id: eval_answers row} -> {"tries": [{id: solved after try k}, ...], "base": the same by the
    visible tests alone for a task with hidden tests (MBPP, EvalPlus's "base"; the tries are "plus"), else
    None}."""
    if not rows:
        return dict(tries=[{}, {}], base=None)
    one = next(iter(rows.values()))

    def solved(base: bool) -> list[dict]:
        per_item = {i: tries_of(r, base) for i, r in rows.items()}
        return [{i: bool(t[k]) for i, t in per_item.items()} for k in range(len(tries_of(one, base)))]
    with_base = "tries_base" in one or "first_base" in one
    return dict(tries=solved(False), base=solved(True) if with_base else None)


def tries_of(row: dict, base: bool = False) -> list:
    """An eval_answers row's `tries` (solved after each try; base: `tries_base`, by MBPP's visible tests
    alone). Rows written before that layout (December 2026) name the two tries `first` and `second`."""
    if "tries" in row:
        return row["tries_base"] if base else row["tries"]
    return [row["first_base"], row["second_base"]] if base else [row["first"], row["second"]]


def vanilla_and_last(folder: Path, last: int) -> tuple[dict, dict, int]:
    """The outcomes of a run's vanilla (step 0) and `last` evaluations in its eval_answers.jsonl, on the
    items judged at both (an item whose program the sandbox could not run, "judged": false, says nothing
    about either model), and how many items that leaves out."""
    answers = read_jsonl(Path(folder) / "eval_answers.jsonl")
    before, after = ({r["id"]: r for r in answers if r["step"] == step} for step in (0, last))
    if not before or not after:
        raise BadInput(f"{folder}: eval_answers.jsonl lacks the evaluation at step 0 or {last}")
    keep = [i for i in before if i in after and all(r[i].get("judged", True) for r in (before, after))]
    return (outcomes({i: before[i] for i in keep}), outcomes({i: after[i] for i in keep}),
            len(before) - len(keep))


def model_text(cfg: dict) -> str:
    """The model a run started from, its warm start included: what its vanilla row is."""
    name = cfg["model"] or "the embedded model"
    warm = cfg.get("warm_start_model")
    return f"{name} after a labelled warm start ({warm['description']})" if warm else name


def method_name(cfg: dict) -> str:
    """The method and, when not the paper's, the variant (--attempts, --reflection-feedback)."""
    name = {"grpo": "GRPO on first attempts"}.get(cfg["method"], f"RRR, {cfg['reflection']} reflection")
    variants = ([f"{cfg['attempts']} tries"] if cfg.get("attempts", 2) != 2 else []) + \
               (["feedback in the reflection prompt"] if cfg.get("reflection_feedback") else [])
    return ", ".join([name] + variants)


def paper_table(runs: list[dict], shared: bool) -> tuple[list, list, list]:
    """The paper's table (accuracy after each try) with intervals and paired tests: a vanilla row (shared:
    the run's with the most tries, else each run's own) and a row per trained run; a run with fewer tries
    than another has "-" in the other's columns. Returns (columns, rows as {column: cell}, numbers)."""
    n = len(runs[0]["vanilla"]["tries"][0])
    tries = [f"{try_name(k)} try" for k in range(max(len(r["trained"]["tries"]) for r in runs))]
    versus = [f"{t} vs vanilla" for t in tries]
    # With hidden tests (MBPP) the tries count visible and hidden tests; MBPP's own tests alone follow, so
    # that results stay comparable with papers (EvalPlus's base and plus columns).
    base = all(r["vanilla"]["base"] is not None and r["trained"]["base"] is not None for r in runs)
    own = [f"{t}, MBPP's own tests" for t in tries] if base else []

    def accuracies(o: dict) -> dict:
        return {c: with_interval(sum(o[key][k].values()), n) if k < len(o[key]) else "-"
                for key, names in (("tries", tries), ("base", own)) for k, c in enumerate(names)}

    def vanilla_row(name: str, v: dict) -> dict:
        return dict(run=name, method="-", steps=0) | accuracies(v) | dict.fromkeys(versus, "")
    longest = max((r["vanilla"] for r in runs), key=lambda v: len(v["tries"]))
    rows, numbers = [vanilla_row("vanilla", longest)] if shared else [], []
    for run in runs:
        before, after = longest if shared else run["vanilla"], run["trained"]
        if not shared:
            rows.append(vanilla_row(run["name"] + " (its vanilla)", before))
        change = [paired_change(before["tries"][k], after["tries"][k]) for k in range(len(after["tries"]))]
        rows.append(dict(run=run["name"], method=run["method"], steps=run["steps"]) | accuracies(after)
                    | {c: change_text(change[k]) if k < len(change) else "-" for k, c in enumerate(versus)})
        solved = [sum(t.values()) for t in after["tries"]]
        mbpp = {f"{prefix}{try_name(k)}_base": sum(o["base"][k].values()) / n
                for prefix, o in (("", after), ("vanilla_", before)) if base for k in range(len(solved))}
        numbers.append(dict(name=run["name"], method=run["method"], steps=run["steps"], first=solved[0] / n,
                            second=solved[1] / n, interval_first=wilson_interval(solved[0], n),
                            interval_second=wilson_interval(solved[1], n), change_first=change[0],
                            change_second=change[1], **mbpp, tries=[s / n for s in solved],
                            intervals=[wilson_interval(s, n) for s in solved], changes=change,
                            # each try against the one before, on the same items (a solved item stays solved)
                            successive=[paired_change(after["tries"][k - 1], after["tries"][k])
                                        for k in range(1, len(solved))]))
    return ["run", "method", "steps"] + tries + versus + own, rows, numbers


def weights_unchanged(cfg: dict, metrics: list[dict]) -> str | None:
    """One line when no step had a nonzero gradient (every advantage 0, or no token trained, and the policy
    still the reference model, so the KL term had none either): then Adam moved no weight, and the "trained"
    model is the initial one, up to weight decay. None when some step learned something (or none is known)."""
    if not metrics or any(m["grad_norm"] > 0 for m in metrics):
        return None
    why = ("no step had a nonzero gradient (every group's rewards were equal, so every advantage was 0, and "
           "the policy never left the reference model)")
    if cfg.get("weight_decay", 0) > 0:
        return f"weights changed by weight decay only: {why}"
    return f"weights unchanged: {why}; the trained row is the initial model evaluated again"


def write_rrr_report(cfg: dict, out: Path, evals, metrics, wall, split_size, forgetting) -> str:
    """report.md, report.json and plot.png of one run (cfg: its recorded config): the paper's table, plus a
    first-try column per task of the forgetting check (forgetting: {task: (before, after)}, each {item id:
    solved}). Returns the table with its caption, and weights_unchanged's line when it has one."""
    trained, what = evals[-1], method_name(cfg)
    vanilla, last, unjudged = vanilla_and_last(out, trained["step"])
    unchanged = weights_unchanged(cfg, metrics)
    name = f"trained ({trained['step']} steps{', weights unchanged' if unchanged else ''})"
    run = dict(name=name, method=what, steps=trained["step"], vanilla=vanilla, trained=last)
    columns, rows, numbers = paper_table([run], shared=True)
    paired = numbers[0]
    # The paper's columns (accuracy after each try); the changes and their tests follow the table.
    columns = ["model"] + [c for c in columns if c.endswith((" try", "MBPP's own tests"))]
    vanilla_row, trained_row = [dict(row, model=row["run"]) for row in rows]
    forgot = {}
    for name, (was, now) in forgetting.items():
        n, k, m = len(was), sum(was.values()), sum(now.values())
        columns.append(f"{name} first try ({n} items)")
        vanilla_row[columns[-1]], trained_row[columns[-1]] = with_interval(k, n), with_interval(m, n)
        forgot[name] = dict(before=k / n, after=m / n, change=paired_change(was, now))
    table = markdown_table(columns, [vanilla_row, trained_row])
    split = cfg.get("eval_split", "test")       # --eval-split; runs before the flag scored the test split
    subset = ("the whole split" if trained["n"] >= split_size
              else "a subset (--eval-size), not the paper's full test set" if split == "test"
              else "a subset (--eval-size)")
    lines = [f"# {what} on {cfg['task']}: {model_text(cfg)}", "",
             f"{split.capitalize()} set: {trained['n']} of {split_size} {cfg['task']} {split} examples, "
             f"{subset}. Training: "
             f"{len(metrics)} steps of {cfg['batch_size']} failures x {cfg['num_generations']} generations. "
             f"Wall time {wall / 60:.1f} min.", "", table, "", CAPTION, ""]
    if unchanged:
        lines[3:3] = [f"**{unchanged[0].upper() + unchanged[1:]}.**", ""]
    lines += [f"- {try_name(k)} try, vanilla -> trained: {change_text(c)}"
              for k, c in enumerate(paired["changes"])]
    v = vanilla["tries"]       # what each reflection and retry adds, on the same items
    lines += [f"- {try_name(k)} try against the {try_name(k - 1)}: vanilla "
              f"{change_text(paired_change(v[k - 1], v[k]))}; trained "
              f"{change_text(paired['successive'][k - 1])}" for k in range(1, len(v))]
    lines += [f"- forgetting, {name} first try: {change_text(f['change'])}" for name, f in forgot.items()]
    episodes = sum(m.get("not_judged", 0) for m in metrics)
    if unjudged or episodes:
        lines += [f"- not judged (the sandbox could not run the program): {unjudged} test items, left out of "
                  f"the table at both evaluations; {episodes} training episodes, which got no loss"]
    rewards = [m["reward"] for m in metrics]
    lines += ["", f"Mean reward (retry success) per step: first {pct(rewards[0] if rewards else None)}, last "
              f"{pct(rewards[-1] if rewards else None)}; zero-variance groups on average "
              f"{pct(sum(m['zero_variance_groups'] for m in metrics) / max(len(metrics), 1))}.", "",
              "![reward, accuracy, KL and trained length](plot.png)", "",
              "plot.png: (a) mean reward and zero-variance groups per training step; (b) first- and "
              f"second-try {split} accuracy at each evaluation; (c) mean KL to the initial model and trained "
              "tokens per episode."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "report.json", dict(config=cfg, test=dict(n=trained["n"], split_size=split_size,
                                                               split=split),
                                         vanilla=evals[0], trained=trained, paired=paired, forgetting=forgot,
                                         evals=evals, steps=metrics, wall_seconds=wall))
    plot_rrr(out / "plot.png", metrics, evals, title=f"{what} on {cfg['task']}")
    return table + "\n\n" + CAPTION + (f"\n\n{unchanged}" if unchanged else "")


# --- rerest.py's report ----------------------------------------------------------------------------------

TASK_NAMES = {"mbpp": "MBPP", "countdown": "Countdown", "function_calling": "function-calling"}


def score(items: dict | None, base: dict | None) -> dict | None:
    """From per-item results {test problem key: passed}: k, n, pass@1, 95% Wilson interval and, given the
    "base" row's results, the paired change with its exact McNemar test. None for a row without results."""
    if items is None:
        return None
    k, n = sum(items.values()), len(items)
    got = dict(k=k, n=n, pass1=k / n if n else None, interval=list(wilson_interval(k, n)))
    if base is not None:        # on the problems judged in both rows (the sandbox may have failed on some)
        common = [key for key in items if key in base]
        got["change"] = paired_change({key: base[key] for key in common}, {key: items[key] for key in common})
    return got


def rerest_legend(n: int) -> str:
    return (f"Each pass@1 carries its 95% Wilson interval. Each row's change from \"base\" is paired on the "
            f"same {n} problems and tested with the exact two-sided McNemar test; \"within noise\" means "
            f"p >= 0.05: on this many problems the difference cannot be told from chance.")


def rerest_report(cfg, rows: dict, sizes: dict, split_size: int | None, dpo: dict | None = None,
                  config: dict | None = None) -> tuple[str, str, dict]:
    """report.md's text, its table and report.json's content. rows[name] = dict(items={key: passed} or None,
    base_items (MBPP's own tests alone), sc_items (--self-consistency), time, folder, note, not_judged),
    each compared with rows["base"] on the same problems; split_size: the whole test split's; dpo:
    dpo_pairs' counts; config: the settings report.json records (default: the flags)."""
    base = rows["base"]
    n = len(base["items"])
    split = "?" if split_size is None else split_size
    where = f"{n} of {split} {TASK_NAMES.get(cfg.task, cfg.task)} test problems"
    scored = [("pass1", "items", f"pass@1 [95% CI] on {where}")]        # (column, rows' key, title)
    if base.get("base_items"):      # MBPP: the main column counts hidden tests too; EvalPlus's "base" column
        scored.append(("pass1_base", "base_items", "pass@1 [95% CI], MBPP's own tests only"))
    if cfg.self_consistency:
        scored.append(("sc", "sc_items", f"pass@1 [95% CI], self-consistency {cfg.self_consistency}"))
    columns = {"row": "row"}
    for column, _, title in scored:
        columns |= {column: title, column + " vs base": "vs base"}
    columns |= {"D_M": "D_M size", "D_R": "D_R size", "time": "wall time"}
    body, changes, summary = [], [], {}
    for name, r in rows.items():
        line = dict(row=name)
        summary[name] = {k: v for k, v in r.items() if k not in ("items", "base_items", "sc_items")}
        for column, key, _ in scored:
            got = score(r.get(key), None if name == "base" else base.get(key))
            summary[name][column], summary[name][key] = got, r.get(key)
            change = (got or {}).get("change")
            line[column] = with_interval(got["k"], got["n"]) if got else "-"
            line[column + " vs base"] = "-" if not change else (
                f"{100 * change['change']:+.1f} pts, p = {change['p_value']:.3g}"
                + ("" if change["p_value"] < 0.05 else ", within noise"))
            if change:
                changes.append(f"- {name}{'' if column == 'pass1' else ' (self-consistency)'} vs base: "
                               f"{change_text(change)}")
        line["D_M"], line["D_R"] = sizes.get(name, ("-", "-"))
        line["time"] = f"{r['time'] / 60:.1f} min"
        body.append(line)
    table = markdown_table(columns, body)
    subset = ("the whole split" if split_size == n
              else "a subset (--eval-size), not the paper's full-split protocol")
    if cfg.data_dir is None:        # rerest.run resolved it: None is the offline data
        subset += "; offline data, not the real split (pass --data-dir)"
    text = (f"# Re-ReST on {cfg.task}: {cfg.model or f'{EMBEDDED_MODEL} (embedded)'}\n\nTest set: {where}, "
            f"{subset}. k = {cfg.k} samples per training problem; "
            f"{'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'full fine-tuning'}, {cfg.epochs} epochs.\n\n"
            f"{table}\n\n{rerest_legend(n)}\n" + "".join(f"\n{c}" for c in changes) + "\n")
    if getattr(cfg, "warm_start", 0):
        text += (f"\nThe base model is a labelled warm start of {cfg.warm_start} solver-written answers"
                 f"{' with labelled reflections' if cfg.warm_start_reflections else ''} (warmstart.py), not "
                 "the model as published: every row starts from it.\n")
    if dpo is not None:
        text += (f"\nDPO pairs: {dpo['pairs']}, the failed sample rejected in each; chosen: its own passing "
                 f"correction from D_R in {dpo['own_correction']}, another passing sample of its problem "
                 f"from D_M (no correction passed) in {dpo['fallback']}. {dpo['unpaired']} failed samples "
                 "had neither and are not used.\n")
    if cfg.self_consistency:
        text += ("\nSelf-consistency on MBPP is not a blind test-time method: the reflector's prompt holds "
                 "the asserts with their expected values, and the vote runs the programs on the same test "
                 "inputs.\n")
    unjudged = [f"{name}, {r['not_judged']} problems" for name, r in rows.items() if r.get("not_judged")]
    if unjudged:
        text += ("\nNot judged (the sandbox could not run the program; left out of pass@1 and of the paired "
                 f"tests): {'; '.join(unjudged)}.\n")
    notes = [f"{name}, {r['note']}" for name, r in rows.items() if r.get("note")]
    if notes:
        text += f"\nRows without a score: {'; '.join(notes)}.\n"
    return text, table, dict(config=asdict(cfg) if config is None else config,
                             test=dict(n=n, split_size=split_size, task=cfg.task), rows=summary, sizes=sizes,
                             dpo_pairs=dpo)


def recorded_config(cfg, out: Path) -> dict:
    """The settings as invocations.jsonl and report.json record them: the flags, with what the defaults
    stood for (the embedded model's folder, the absolute run folder). The stage hashes read --model as
    given, so a rerun with the same flags still reuses every stage."""
    from model import resolve_model_path       # here: model.py loads torch, which compare.py never needs
    return dict(asdict(cfg), model=cfg.model or resolve_model_path(None), out=str(Path(out).resolve()))


def write_rerest_report(cfg, out: Path, rows: dict, sizes: dict, split_size: int | None, dpo: dict | None,
                        main: bool) -> str:
    """report.md, report.json and plot.png in `out` (rank 0 writes: `main`); returns the table and legend."""
    text, table, summary = rerest_report(cfg, rows, sizes, split_size, dpo, recorded_config(cfg, out))

    def pass1(column: str) -> dict:     # {row name: pass@1 or None}, for the plot
        return {name: (row[column] or {}).get("pass1") for name, row in summary["rows"].items()}
    if main:
        (Path(out) / "report.md").write_text(text + "\n![pass@1 per row](plot.png)\n")
        write_json(Path(out) / "report.json", summary)
        plot_rerest(Path(out) / "plot.png", pass1("pass1"), pass1("sc") if cfg.self_consistency else None,
                    title=f"Re-ReST on {cfg.task}")
    return table + "\n\n" + rerest_legend(summary["test"]["n"])


# --- the pictures (matplotlib) ---------------------------------------------------------------------------

# Fixed sizes, so that every report's picture has the same pixels (figsize in inches x PLOT_DPI).
PLOT_DPI = 100
RRR_FIGSIZE = (15.0, 4.5)       # 1500 x 450: three panels side by side
REREST_FIGSIZE = (10.0, 5.0)    # 1000 x 500


def _figure(figsize):
    """A Figure drawn by the Agg canvas. Not pyplot: it keeps global state and picks a GUI backend, neither
    of which a training script wants."""
    require("matplotlib", "pip install matplotlib", "writing the report's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path):
    """Through a temporary name, so that a crash never leaves a half-written plot."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    fig.savefig(tmp, format="png", dpi=PLOT_DPI)
    os.replace(tmp, path)


def _values(rows: list[dict], key: str) -> list[float]:
    """A missing or None value becomes NaN, which matplotlib leaves as a gap."""
    return [math.nan if r.get(key) is None else float(r[key]) for r in rows]


def _no_data(ax, text: str):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=12)


def _steps_axis(ax, steps):
    """Whole-number ticks; a single step gets a range around it (matplotlib would zoom into fractions)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps and min(steps) == max(steps):
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def _plot_legend(ax, *axes, below=True):
    """One legend for the lines of several axes (a twinx pair), below the panel so that it covers no line
    (below=False: inside, where matplotlib finds room); none if nothing was drawn (else matplotlib warns)."""
    handles = [h for a in (ax,) + axes for h in a.get_legend_handles_labels()[0]]
    if handles and below:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, frameon=False)
    elif handles:
        ax.legend(handles=handles, loc="best", fontsize=9)


def _two_lines(ax, x, under, over, under_label, over_label):
    """Two curves that may coincide: `under` wide and pale, `over` thin with open markers on top, so that
    both stay visible where they are equal; and a note when they are equal everywhere."""
    ax.plot(x, under, marker="s", ms=8, lw=5, alpha=0.35, color="C1", label=under_label)
    ax.plot(x, over, marker="o", ms=5, lw=1.5, mfc="none", color="C0", label=over_label)
    if under == over:
        ax.text(0.5, 0.93, "the two curves coincide", transform=ax.transAxes, ha="center", color="0.3",
                fontsize=9)


def plot_rrr(path: Path, metrics: list[dict], evals: list[dict], title: str | None = None):
    """rrr.py's plot.png: (a) mean reward and zero-variance groups per training step; (b) test accuracy
    after each try at each evaluation (in [0, 1]); (c) KL to the initial model (`mean_kl`, left axis) and
    trained tokens per episode (right axis) per step. A panel without data says so."""
    from matplotlib.ticker import PercentFormatter
    fig = _figure(RRR_FIGSIZE)
    if title:
        fig.suptitle(title)
    a, b, c = fig.subplots(1, 3)
    steps, at = [m["step"] for m in metrics], [e["step"] for e in evals]
    for ax, x in ((a, steps), (b, at), (c, steps)):
        _steps_axis(ax, x)
        ax.grid(alpha=0.3)
    # Markers, so that a run with a single step or evaluation still shows its point.
    if metrics:
        _two_lines(a, steps, _values(metrics, "zero_variance_groups"), _values(metrics, "reward"),
                   "zero-variance groups (no signal)", "mean reward (retry solved)")
    else:
        _no_data(a, "no training steps")
    a.set(title="(a) reward per training step", xlabel="training step", ylabel="fraction", ylim=(-0.03, 1.03))
    _plot_legend(a)
    if evals:
        _two_lines(b, at, _values(evals, "second"), _values(evals, "first"), "second try (after reflection)",
                   "first try")
        for k in range(2, len(evals[-1].get("tries", []))):       # --attempts > 2
            b.plot(at, [e["tries"][k] for e in evals], marker="^", ms=5, ls=":", color=f"C{k}",
                   label=f"try {k + 1}")
    else:
        _no_data(b, "no evaluations")
    b.set(title="(b) test accuracy per evaluation", xlabel="training step", ylabel="accuracy",
          ylim=(-0.03, 1.03))
    b.yaxis.set_major_formatter(PercentFormatter(1.0))
    _plot_legend(b)
    c2 = c.twinx()      # KL and length have unrelated units: two y axes, each coloured like its line
    if metrics:
        kl, length = _values(metrics, "mean_kl"), _values(metrics, "trained_length")
        c.plot(steps, kl, color="C0", marker="o", ms=3, label="mean KL to initial model")
        c2.plot(steps, length, color="C3", marker="s", ms=3, ls="--", label="trained tokens per episode")
        # Both are at least 0: axes from 0; a constant 0 (beta = 0, nothing updated) is said, not zoomed into.
        top_kl = max([v for v in kl if v == v] + [0.0])
        c.set_ylim(0, top_kl * 1.15 if top_kl > 0 else 1.0)
        c2.set_ylim(0, max([v for v in length if v == v] + [1.0]) * 1.15)
        if top_kl == 0:
            c.text(0.5, 0.93, "KL is 0 at every step", transform=c.transAxes, ha="center", color="C0",
                   fontsize=9)
    else:
        _no_data(c, "no training steps")
    c.set(title="(c) KL and trained length per step", xlabel="training step")
    c.set_ylabel("mean KL (k3, per token)", color="C0")
    c2.set_ylabel("trained tokens per episode", color="C3")
    _plot_legend(c, c2)
    _save(fig, path)


def plot_rerest(path: Path, rows: dict, sc: dict | None = None, title: str | None = None):
    """Re-ReST's table as bars: {row name: pass@1 in [0, 1], or None for a row without a score} and, given,
    the self-consistency pass@1 beside it. A None has no bar and says "n/a" (a missing score, not a zero)."""
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
           ylabel="pass@1 (share of test problems solved)", ylim=(0, top), xlim=(-0.6, len(names) - 0.4))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="y", alpha=0.3)
    _plot_legend(ax, below=False)
    _save(fig, path)
