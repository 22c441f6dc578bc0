"""The paper's table for several rrr.py runs side by side (RRR, its controls, other seeds or models), written
to --out (default runs/comparison.md) with its numbers beside it (runs/comparison.json):

    python compare.py runs/rrr-countdown runs/generic-countdown runs/grpo-countdown --out runs/table.md
    python compare.py runs/*         # every finished run; what is not a run folder is skipped with a note

Each run contributes its last evaluation: accuracy after each try (first, second, and more with rrr.py's
--attempts) with 95% Wilson intervals, and the change from the vanilla model on the same test items with an
exact McNemar test. Runs must share the task, the test items and the vanilla model (one line and exit 2
otherwise); when their vanilla evaluations agree item by item on the tries they share (greedy decoding of the
same model with the same prompts) they are shown once and every run is paired with it, else each run is
paired with its own.
"""

import argparse
import json
import sys
from pathlib import Path

from report import (CAPTION, markdown_table, method_name, model_text, paper_table, vanilla_and_last,
                    weights_unchanged)
from runs import BadInput, main_guard, setting_differs, write_json


def load_run(folder: Path) -> dict | None:
    """A finished run: its settings, and its per-item results at the vanilla and the last evaluation. None
    for what is not a run (a file, as this script's own output in runs/; a folder without config.json), so
    that `runs/*` can be given; a run that has not finished is refused."""
    if not folder.exists():
        raise BadInput(f"{folder}: no such file or folder")
    if not (folder / "config.json").exists():
        return None
    if not (folder / "report.json").exists():
        raise BadInput(f"{folder}: no report.json (the run has not finished)")
    data = json.loads((folder / "report.json").read_text())
    cfg, last = data["config"], data["trained"]["step"]
    vanilla, trained, _ = vanilla_and_last(folder, last)
    unchanged = " (weights unchanged)" if weights_unchanged(cfg, data.get("steps", [])) else ""
    return dict(name=str(folder) + unchanged, cfg=cfg, steps=last, method=method_name(cfg), vanilla=vanilla,
                trained=trained)


def agree(a: dict, b: dict) -> bool:
    """Two evaluations' outcomes agree on every try and base column that both have."""
    m = min(len(a["tries"]), len(b["tries"]))
    return a["tries"][:m] == b["tries"][:m] and (a["base"] is None or b["base"] is None
                                                 or a["base"][:m] == b["base"][:m])


def compare(folders: list[Path]) -> tuple[str, dict]:
    loaded = {f: load_run(f) for f in folders}
    for folder in (f for f, r in loaded.items() if r is None):
        print(f"skipped {folder}: not an rrr.py run folder (no config.json)", file=sys.stderr)
    runs = [r for r in loaded.values() if r is not None]
    if not runs:
        raise BadInput("none of the given paths is an rrr.py run folder (each has config.json and "
                       "report.json)")
    first = runs[0]
    settings = dict(task=lambda r: r["cfg"]["task"], items=lambda r: sorted(r["vanilla"]["tries"][0]),
                    model=lambda r: r["cfg"]["model"], warm_start=lambda r: r["cfg"].get("warm_start"))
    names = dict(task="task", items="test items", model="vanilla model", warm_start="warm start")
    for run in runs[1:]:
        for key, get in settings.items():
            if setting_differs(key, get(first), get(run)):     # as in a resume: one embedded model
                raise BadInput(f"{run['name']} has another {names[key]} than {first['name']}: not comparable")
    # Greedy decoding of one model gives one vanilla evaluation, up to the tries a run makes; where the runs'
    # differ (other max lengths, or feedback in the reflection prompt, say), each is paired with its own.
    shared = all(agree(a["vanilla"], b["vanilla"]) for a in runs for b in runs)
    columns, rows, numbers = paper_table(runs, shared)
    cfg, n = first["cfg"], len(first["vanilla"]["tries"][0])
    title = f"# {cfg['task']}: {n} test items, vanilla model {model_text(cfg)}\n\n" + CAPTION
    if not shared:
        title += " The vanilla evaluations differ item by item: each run is paired with its own."
    return (title + "\n\n" + markdown_table(columns, rows),
            dict(task=cfg["task"], n=n, shared_vanilla=shared, runs=numbers))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path,
                    help="rrr.py run folders (each with report.json and eval_answers.jsonl)")
    ap.add_argument("--out", type=Path, default=Path("runs/comparison.md"),
                    help="where to write the table (markdown; the numbers go beside it as .json)")
    return ap.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    table, data = compare(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    write_json(args.out.with_suffix(".json"), data)
    print(table + f"\n\nwritten: {args.out}")


if __name__ == "__main__":
    main_guard(run)
