"""Re-ReST's ablation table (rerest.py writes it as report.md and report.json): each row's pass@1 with its
95% Wilson interval, its paired change from "base" on the same test problems with the exact McNemar test,
the sizes of D_M and D_R, wall time; the DPO pairs' counts; what self-consistency on MBPP sees.
"""

from dataclasses import asdict
from pathlib import Path

from model import resolve_model_path
from plots import plot_rerest
from runs import EMBEDDED_MODEL, change_text, markdown_table, paired_change, wilson_interval, with_interval, write_json

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


def legend(n: int) -> str:
    return (f"Each pass@1 carries its 95% Wilson interval. Each row's change from \"base\" is paired on the same {n} "
            f"problems and tested with the exact two-sided McNemar test; \"within noise\" means p >= 0.05: on this "
            f"many problems the difference cannot be told from chance.")


def report(cfg, rows: dict, sizes: dict, split_size: int | None, dpo: dict | None = None,
           config: dict | None = None) -> tuple[str, str, dict]:
    """report.md's text, its table and report.json's content from each row's per-item results: rows[name] =
    dict(items={key: passed} or None, base_items (MBPP's own tests alone), sc_items (--self-consistency), time,
    folder, note, not_judged); every row is compared with rows["base"] on the same problems. split_size: the
    whole test split's; dpo: dpo_pairs' counts; config: the settings report.json records (default: the flags)."""
    base = rows["base"]
    n = len(base["items"])
    where = f"{n} of {split_size if split_size is not None else '?'} {TASK_NAMES.get(cfg.task, cfg.task)} test problems"
    columns = [("pass1", "items", f"pass@1 [95% CI] on {where}")]
    if base.get("base_items"):      # MBPP: the main column counts hidden tests too; EvalPlus's "base" column
        columns.append(("pass1_base", "base_items", "pass@1 [95% CI], MBPP's own tests only"))
    if cfg.self_consistency:
        columns.append(("sc", "sc_items", f"pass@1 [95% CI], self-consistency {cfg.self_consistency}"))
    header = ["row"] + [h for _, _, head in columns for h in (head, "vs base")] + ["D_M size", "D_R size", "wall time"]
    body, changes, summary = [], [], {}
    for name, r in rows.items():
        line, summary[name] = [name], {k: v for k, v in r.items() if k not in ("items", "base_items", "sc_items")}
        for col, key, head in columns:
            got = score(r.get(key), None if name == "base" else base.get(key))
            summary[name][col], summary[name][key] = got, r.get(key)
            change = (got or {}).get("change")
            line += [with_interval(got["k"], got["n"]) if got else "-",
                     "-" if not change else f"{100 * change['change']:+.1f} pts, p = {change['p_value']:.3g}"
                     + ("" if change["p_value"] < 0.05 else ", within noise")]
            if change:
                changes.append(f"- {name}{'' if col == 'pass1' else ' (self-consistency)'} vs base: {change_text(change)}")
        dm, dr = sizes.get(name, ("-", "-"))
        body.append(line + [dm, dr, f"{r['time'] / 60:.1f} min"])
    table = markdown_table(header, body)
    subset = ("the whole split" if split_size == n else "a subset (--eval-size), not the paper's full-split protocol")
    if cfg.data_dir is None:        # rerest.run resolved it: None is the offline data
        subset += "; offline data, not the real split (pass --data-dir)"
    model = cfg.model or f"{EMBEDDED_MODEL} (embedded)"
    text = (f"# Re-ReST on {cfg.task}: {model}\n\nTest set: {where}, {subset}. k = {cfg.k} samples per training "
            f"problem; {'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'full fine-tuning'}, {cfg.epochs} epochs.\n\n"
            f"{table}\n\n{legend(n)}\n" + "".join(f"\n{c}" for c in changes) + "\n")
    if dpo is not None:
        text += (f"\nDPO pairs: {dpo['pairs']}, the failed sample rejected in each; chosen: its own passing correction "
                 f"from D_R in {dpo['own_correction']}, another passing sample of its problem from D_M (no correction "
                 f"passed) in {dpo['fallback']}. {dpo['unpaired']} failed samples had neither and are not used.\n")
    if cfg.self_consistency:
        text += ("\nSelf-consistency on MBPP is not a blind test-time method: the reflector's prompt holds the asserts "
                 "with their expected values, and the vote runs the programs on the same test inputs.\n")
    if any(r.get("not_judged") for r in rows.values()):
        text += ("\nNot judged (the sandbox could not run the program; left out of pass@1 and of the paired tests): "
                 + "; ".join(f"{name}, {r['not_judged']} problems" for name, r in rows.items() if r.get("not_judged")) + ".\n")
    if any(r.get("note") for r in rows.values()):
        text += "\nRows without a score: " + "; ".join(f"{name}, {r['note']}" for name, r in rows.items() if r.get("note")) + ".\n"
    return text, table, dict(config=asdict(cfg) if config is None else config,
                             test=dict(n=n, split_size=split_size, task=cfg.task), rows=summary, sizes=sizes, dpo_pairs=dpo)


def recorded_config(cfg, out: Path) -> dict:
    """The settings as invocations.jsonl and report.json record them: the flags, with what the defaults
    stood for (the embedded model's folder, the absolute run folder). The stage hashes read --model as
    given, so a rerun with the same flags still reuses every stage."""
    return dict(asdict(cfg), model=cfg.model or resolve_model_path(None), out=str(Path(out).resolve()))


def write_report(cfg, out: Path, rows: dict, sizes: dict, split_size: int | None, dpo: dict | None,
                 main: bool) -> str:
    """report.md and report.json in `out` (written by rank 0: `main`); returns the table with its legend."""
    text, table, summary = report(cfg, rows, sizes, split_size, dpo, recorded_config(cfg, out))
    table += "\n\n" + legend(summary["test"]["n"])
    if main:
        (Path(out) / "report.md").write_text(text + "\n![pass@1 per row](plot.png)\n")
        write_json(Path(out) / "report.json", summary)
        plot_rerest(Path(out) / "plot.png", pass1_of(summary, "pass1"),
                    pass1_of(summary, "sc") if cfg.self_consistency else None, title=f"Re-ReST on {cfg.task}")
    return table


def pass1_of(summary: dict, column: str) -> dict:
    """{row name: pass@1 or None} of report.json's rows, for the plot."""
    return {name: (row[column] or {}).get("pass1") for name, row in summary["rows"].items()}
