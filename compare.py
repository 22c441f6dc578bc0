"""The paper's table for several rrr.py runs side by side: RRR, its controls, other seeds or models;
and, for one run, rrr.py's report (`write_report`: report.md, report.json, plot.png).

    python compare.py runs/rrr-countdown runs/generic-countdown runs/grpo-countdown [--out runs/comparison.md]
    python compare.py runs/*         # every finished run; what is not a run folder is skipped with a note

It writes the table to --out (default runs/comparison.md) and its numbers beside it (runs/comparison.json).

Each run contributes its last evaluation: accuracy after each try (first, second, and more with rrr.py's
--attempts) with 95% Wilson intervals, and the change from the vanilla model on the same test items with an
exact McNemar test. Runs must
share the task, the test items and the vanilla model (one line and exit 2 otherwise); when their
vanilla evaluations agree item by item on the tries they share (greedy decoding of the same model with the
same prompts) they are shown once and every run is paired with it, else each run is paired with its own.
"""

import argparse
import itertools
import json
import operator
import sys
from pathlib import Path

from plots import plot_rrr
from runs import (BadInput, change_text, main_guard, markdown_table, paired_change, pct, read_jsonl,
                  setting_differs, wilson_interval, with_interval, write_json)


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def try_name(k: int) -> str:
    """"first", "second", ... for try k = 0, 1, ... (rrr.py's --attempts)."""
    return ORDINALS[k] if k < len(ORDINALS) else f"{k + 1}th"


def outcomes(rows: dict) -> dict:
    """{item id: eval_answers row} -> {"tries": [{id: solved after try k}, ...], "base": the same by the
    visible tests alone for a task with hidden tests (MBPP, EvalPlus's "base"; the tries are "plus"), else
    None}. Rows of rrr.py's --attempts K > 2 carry `tries` (and `tries_base`); others the first two."""
    if not rows:
        return dict(tries=[{}, {}], base=None)
    one = next(iter(rows.values()))
    K = len(one["tries"]) if "tries" in one else 2

    def solved(key, base):
        if key in one:
            return [{i: bool(r[key][k]) for i, r in rows.items()} for k in range(K)]
        return [{i: bool(r[f"{try_name(k)}{'_base' if base else ''}"]) for i, r in rows.items()} for k in range(2)]
    has_base = "first_base" in one
    return dict(tries=solved("tries", False), base=solved("tries_base", True) if has_base else None)


def solved_after_each_try(row: dict, K: int, base: bool = False) -> list[bool]:
    """rrr.py's eval_answers row -> [solved after try 1, ..., after try K] (base: by MBPP's visible tests
    alone): a solved item stays solved. Its later tries are in `later_tries`; the chain stops at a success."""
    oks = [row["first_base"], row["second_base"]] if base else [row["first"], row["second"]]
    oks += [t.get("base", False) if base else t["ok"] for t in row.get("later_tries", [])]
    return list(itertools.accumulate(oks + [False] * (K - len(oks)), operator.or_))


def agree(a: dict, b: dict) -> bool:
    """Two evaluations' outcomes agree on every try and base column that both have."""
    m = min(len(a["tries"]), len(b["tries"]))
    return a["tries"][:m] == b["tries"][:m] and (a["base"] is None or b["base"] is None or a["base"][:m] == b["base"][:m])


def judged_at_both(before: dict, after: dict) -> tuple[dict, dict]:
    """Two evaluations' rows ({item id: row}) on the items judged at both: an item whose program the
    sandbox could not run (a row with "judged": false) says nothing about either model."""
    keep = [i for i in before if i in after and before[i].get("judged", True) and after[i].get("judged", True)]
    return {i: before[i] for i in keep}, {i: after[i] for i in keep}


def answers_at(folder: Path, steps) -> dict:
    """{step: {item id: its row of eval_answers.jsonl}} for the evaluations at `steps`."""
    answers = read_jsonl(Path(folder) / "eval_answers.jsonl")
    return {step: {r["id"]: r for r in answers if r["step"] == step} for step in steps}


def load_run(folder: Path) -> dict | None:
    """A finished run: its settings, and its per-item results at the vanilla and the last evaluation. None
    for what is not a run at all (a file, as this script's own output in runs/; a folder without config.json),
    so that `runs/*` can be given; a run that has not finished is refused."""
    report = folder / "report.json"
    if not folder.exists():
        raise BadInput(f"{folder}: no such file or folder")
    if not (folder / "config.json").exists():
        return None
    if not report.exists():
        raise BadInput(f"{folder}: no report.json (the run has not finished)")
    data = json.loads(report.read_text())
    cfg, last = data["config"], data["trained"]["step"]
    at = answers_at(folder, (0, last))
    if not at[0] or not at[last]:
        raise BadInput(f"{folder}: eval_answers.jsonl lacks the evaluation at step 0 or {last}")
    vanilla, trained = judged_at_both(at[0], at[last])
    return dict(name=str(folder), cfg=cfg, steps=last, method=method_name(cfg), vanilla=outcomes(vanilla),
                trained=outcomes(trained))


def model_text(cfg: dict) -> str:
    """The model a run started from, warm start included: what its vanilla row is."""
    name = cfg["model"] or "the embedded model"
    warm = cfg.get("warm_start_model")
    return f"{name} after a labelled warm start ({warm['description']})" if warm else name


def method_name(cfg: dict) -> str:
    """The method and, when not the paper's, the self-correction variant (rrr.py's --attempts, --reflection-feedback)."""
    name = {"grpo": "GRPO on first attempts"}.get(cfg["method"], f"RRR, {cfg['reflection']} reflection")
    variants = ([f"{cfg['attempts']} tries"] if cfg.get("attempts", 2) != 2 else []) + \
               (["feedback in the reflection prompt"] if cfg.get("reflection_feedback") else [])
    return ", ".join([name] + variants)


def paper_table(runs: list[dict], shared: bool) -> tuple[list, list, list]:
    """The paper's table (accuracy after each try) with intervals and paired tests: a vanilla row (shared:
    the run's with the most tries, else each run's own) and a row per trained run; a run with fewer tries
    than another has "-" in the other's columns. Returns (header, rows, numbers)."""
    n = len(runs[0]["vanilla"]["tries"][0])
    K = max(len(r["trained"]["tries"]) for r in runs)
    header = (["run", "method", "steps"] + [f"{try_name(k)} try" for k in range(K)]
              + [f"{try_name(k)} try vs vanilla" for k in range(K)])
    # With hidden tests (MBPP) the tries count visible and hidden tests; MBPP's own tests alone follow, so
    # that results stay comparable with papers (EvalPlus's base and plus columns).
    base = all(r["vanilla"]["base"] is not None and r["trained"]["base"] is not None for r in runs)
    header += [f"{try_name(k)} try, MBPP's own tests" for k in range(K)] if base else []
    rows, numbers = [], []

    def accuracies(o, key="tries"):
        return [with_interval(sum(o[key][k].values()), n) if k < len(o[key]) else "-" for k in range(K)]

    def vanilla_row(name, v):
        return [name, "-", 0] + accuracies(v) + [""] * K + (accuracies(v, "base") if base else [])
    longest = max((r["vanilla"] for r in runs), key=lambda v: len(v["tries"]))
    if shared:
        rows.append(vanilla_row("vanilla", longest))
    for run in runs:
        before, after = longest if shared else run["vanilla"], run["trained"]
        tries = len(after["tries"])
        change = [paired_change(before["tries"][k], after["tries"][k]) for k in range(tries)]
        if not shared:
            rows.append(vanilla_row(run["name"] + " (its vanilla)", before))
        rows.append([run["name"], run["method"], run["steps"]] + accuracies(after)
                    + [change_text(c) for c in change] + ["-"] * (K - tries) + (accuracies(after, "base") if base else []))
        solved = [sum(after["tries"][k].values()) for k in range(tries)]
        numbers.append(dict(name=run["name"], method=run["method"], steps=run["steps"], first=solved[0] / n,
                            second=solved[1] / n, interval_first=wilson_interval(solved[0], n),
                            interval_second=wilson_interval(solved[1], n), change_first=change[0], change_second=change[1],
                            **({f"{try_name(k)}_base": sum(after["base"][k].values()) / n for k in range(tries)}
                               | {f"vanilla_{try_name(k)}_base": sum(before["base"][k].values()) / n for k in range(tries)}
                               if base else {}),
                            tries=[s / n for s in solved], intervals=[wilson_interval(s, n) for s in solved], changes=change,
                            # each try against the one before, on the same items (a solved item stays solved)
                            successive=[paired_change(after["tries"][k - 1], after["tries"][k]) for k in range(1, tries)]))
    return header, rows, numbers


CAPTION = ("Accuracy with its 95% Wilson interval; changes from the vanilla model on the same items with the exact "
           "McNemar test (only items one model solves and the other does not count).")


def compare(folders: list[Path]) -> tuple[str, dict]:
    loaded = {f: load_run(f) for f in folders}
    for folder in (f for f, r in loaded.items() if r is None):
        print(f"skipped {folder}: not an rrr.py run folder (no config.json)", file=sys.stderr)
    runs = [r for r in loaded.values() if r is not None]
    if not runs:
        raise BadInput("none of the given paths is an rrr.py run folder (each has config.json and report.json)")
    first = runs[0]
    for run in runs[1:]:
        # The recorded settings compare as a resume does (setting_differs: the embedded model's names, no warm start).
        for what, key in (("task", lambda r: r["cfg"]["task"]), ("test items", lambda r: sorted(r["vanilla"]["tries"][0])),
                          ("model", lambda r: r["cfg"]["model"]), ("warm_start", lambda r: r["cfg"].get("warm_start"))):
            if key(run) != key(first) and (what not in ("model", "warm_start") or setting_differs(what, key(first), key(run))):
                what = {"model": "vanilla model", "warm_start": "warm start"}.get(what, what)
                raise BadInput(f"{run['name']} has another {what} than {first['name']}: not comparable")
    # Greedy decoding of one model gives one vanilla evaluation, up to the tries a run makes; where the runs'
    # differ (other max lengths, or feedback in the reflection prompt, say), each is paired with its own.
    shared = all(agree(a["vanilla"], b["vanilla"]) for a in runs for b in runs)
    header, rows, numbers = paper_table(runs, shared)
    cfg, n = first["cfg"], len(first["vanilla"]["tries"][0])
    title = (f"# {cfg['task']}: {n} test items, vanilla model {model_text(cfg)}\n\n"
             + CAPTION + ("" if shared else " The vanilla evaluations differ item by item: each run is paired with its own."))
    return title + "\n\n" + markdown_table(header, rows), dict(task=cfg["task"], n=n, shared_vanilla=shared, runs=numbers)


def write_report(cfg: dict, out: Path, evals, metrics, wall, split_size, forgetting) -> str:
    """rrr.py's report.md, report.json and plot.png for one run (cfg: its config as a dict): the paper's
    table with 95% Wilson intervals and, on the same test items, the exact McNemar test of each change
    from the vanilla model (this module's table, one run), plus the forgetting check's columns
    (forgetting: {task: (before, after)}, each {item id: solved}). Returns the table with its legend."""
    vanilla, trained = evals[0], evals[-1]
    at = answers_at(out, (0, trained["step"]))
    before, after = judged_at_both(at[0], at[trained["step"]])
    what = method_name(cfg)
    header, rows, numbers = paper_table([dict(name=f"trained ({trained['step']} steps)", method=what, steps=trained["step"],
                                         vanilla=outcomes(before), trained=outcomes(after))], True)
    # The paper's columns (accuracy after each try); the changes and their tests follow the table.
    keep = [i for i, name in enumerate(header) if i == 0 or name.endswith((" try", "MBPP's own tests"))]
    header, rows = ["model"] + [header[i] for i in keep[1:]], [[r[i] for i in keep] for r in rows]
    forgot = forgetting_columns(header, rows, forgetting)
    table = markdown_table(header, rows)
    subset = "the whole split" if trained["n"] >= split_size else "a subset (--eval-size), not the paper's full test set"
    rewards = [m["reward"] for m in metrics]
    lines = [f"# {what} on {cfg['task']}: {model_text(cfg)}", "",
             f"Test set: {trained['n']} of {split_size} {cfg['task']} test examples, {subset}. Training: {len(metrics)} "
             f"steps of {cfg['batch_size']} failures x {cfg['num_generations']} generations. Wall time {wall / 60:.1f} min.", "",
             table, "", CAPTION, ""]
    lines += [f"- {try_name(k)} try, vanilla -> trained: {change_text(c)}" for k, c in enumerate(numbers[0]["changes"])]
    v = outcomes(before)["tries"]       # what each reflection and retry adds, on the same items
    lines += [f"- {try_name(k)} try against the {try_name(k - 1)}: vanilla {change_text(paired_change(v[k - 1], v[k]))}; "
              f"trained {change_text(numbers[0]['successive'][k - 1])}" for k in range(1, len(v))]
    lines += [f"- forgetting, {name} first try: {change_text(f['change'])}" for name, f in forgot.items()]
    unjudged, episodes = len(at[0]) - len(before), sum(m.get("not_judged", 0) for m in metrics)
    if unjudged or episodes:
        lines += [f"- not judged (the sandbox could not run the program): {unjudged} test items, left out of the table "
                  f"at both evaluations; {episodes} training episodes, which got no loss"]
    lines += ["", f"Mean reward (retry success) per step: first {pct(rewards[0] if rewards else None)}, last "
              f"{pct(rewards[-1] if rewards else None)}; zero-variance groups on average "
              f"{pct(sum(m['zero_variance_groups'] for m in metrics) / max(len(metrics), 1))}.", "",
              "![reward, accuracy, KL and trained length](plot.png)", "",
              "plot.png: (a) mean reward and zero-variance groups per training step; (b) first- and second-try test "
              "accuracy at each evaluation; (c) mean KL to the initial model and trained tokens per episode."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "report.json", dict(config=cfg, test=dict(n=trained["n"], split_size=split_size),
                                         vanilla=vanilla, trained=trained, paired=numbers[0], forgetting=forgot,
                                         evals=evals, steps=metrics, wall_seconds=wall))
    plot_rrr(out / "plot.png", metrics, evals, title=f"{what} on {cfg['task']}")
    return table + "\n\n" + CAPTION


def forgetting_columns(header: list, rows: list, forgetting: dict) -> dict:
    """The forgetting check in the report's table: a first-try column per task (vanilla row, trained row),
    added in place. Returns {task: before, after and the paired change}."""
    forgot = {}
    for name, (before, after) in forgetting.items():
        n = len(before)
        header.append(f"{name} first try ({n} items)")
        rows[0].append(with_interval(sum(before.values()), n))
        rows[1].append(with_interval(sum(after.values()), n))
        forgot[name] = dict(before=sum(before.values()) / n, after=sum(after.values()) / n,
                            change=paired_change(before, after))
    return forgot


def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="rrr.py run folders (each with report.json and eval_answers.jsonl)")
    ap.add_argument("--out", type=Path, default=Path("runs/comparison.md"),
                    help="where to write the table (markdown; the numbers go beside it as .json)")
    args = ap.parse_args(argv)
    table, data = compare(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    write_json(args.out.with_suffix(".json"), data)
    print(table + f"\n\nwritten: {args.out}", file=sys.stdout)


if __name__ == "__main__":
    main_guard(run)
