"""compare.py on hand-built run folders, against hand-computed intervals and McNemar p-values, and
--config (runs.parse_config) with a command-line flag overriding it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import report
import runs
from rrr import Config

REPO = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, *, task="countdown", model=None, method="rrr", reflection="model", ids=range(10),
             vanilla_first=(0, 1, 2), vanilla_second=(0, 1, 2, 3), first=(), second=(), steps=8, warm_start=None,
             base=None, grad_norms=None):
    """A finished run as compare.py reads it: report.json and eval_answers.jsonl (items by index). base:
    (vanilla first, vanilla second, first, second) items solved by the visible tests alone (MBPP)."""
    folder.mkdir(parents=True)
    cfg = dict(task=task, model=model, method=method, reflection=reflection)
    if warm_start:
        cfg.update(warm_start=warm_start, warm_start_model=dict(description=f"SFT on {warm_start} answers", folder="f"))
    (folder / "config.json").write_text(json.dumps(cfg))
    report = dict(config=cfg, trained=dict(step=steps))
    if grad_norms is not None:        # report.json's per-step metrics, of which compare.py reads the norms
        report["steps"] = [dict(step=k + 1, grad_norm=g) for k, g in enumerate(grad_norms)]
    (folder / "report.json").write_text(json.dumps(report))
    rows = [dict(id=f"q{i}", step=0, tries=[i in vanilla_first, i in vanilla_second]) for i in ids]
    rows += [dict(id=f"q{i}", step=steps, tries=[i in first, i in second]) for i in ids]
    if base:
        for r in rows:
            at = 0 if r["step"] == 0 else 2
            r["tries_base"] = [int(r["id"][1:]) in base[at], int(r["id"][1:]) in base[at + 1]]
    (folder / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hand_computed_intervals_and_paired_tests():
    assert report.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)       # z^2/(n+z^2)
    assert report.wilson_interval(7, 10) == pytest.approx((0.39678, 0.89221), abs=1e-5)
    assert report.wilson_interval(10, 10)[1] == 1.0 and report.wilson_interval(10, 10)[0] == pytest.approx(0.72247, abs=1e-5)
    # 10 discordant pairs, 1 against 9: two-sided binomial tail 2 (1 + 10) / 2^10.
    assert report.mcnemar_exact(1, 9) == pytest.approx(22 / 1024) and report.mcnemar_exact(9, 1) == report.mcnemar_exact(1, 9)
    assert report.mcnemar_exact(5, 5) == 1.0 and report.mcnemar_exact(0, 0) == 1.0
    assert report.mcnemar_exact(0, 4) == pytest.approx(2 / 16)


def test_three_runs_side_by_side_and_a_refusal(tmp_path):
    a = fake_run(tmp_path / "rrr", first=range(7), second=range(8))
    b = fake_run(tmp_path / "generic", reflection="generic", first=(0, 1, 5), second=(0, 1, 2, 3))
    c = fake_run(tmp_path / "grpo", method="grpo", first=range(10), second=range(10))
    out = tmp_path / "cmp" / "table.md"
    done = subprocess.run([sys.executable, str(REPO / "compare.py"), str(a), str(b), str(c), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["shared_vanilla"] and data["n"] == 10
    rrr, generic, grpo = data["runs"]
    assert (rrr["first"], rrr["change_first"]["gained"], rrr["change_first"]["lost"]) == (0.7, 4, 0)
    assert rrr["change_first"]["p_value"] == pytest.approx(2 / 16)                        # 4 vs 0
    assert (generic["change_first"]["gained"], generic["change_first"]["lost"], generic["change_first"]["p_value"]) == (1, 1, 1.0)
    assert grpo["change_first"]["p_value"] == pytest.approx(2 / 2 ** 7)                    # 7 vs 0
    text = out.read_text()
    assert "70.0% [39.7, 89.2]" in text and "within noise" in text and "significant at 5%" in text
    assert "| vanilla |" in text and text.count("McNemar") == 7        # the caption, then 2 per run
    # Another task: refused in one line, nothing written.
    d = fake_run(tmp_path / "other", task="function_calling")
    refused = subprocess.run([sys.executable, str(REPO / "compare.py"), str(a), str(d), "--out", str(tmp_path / "x.md")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "another task" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "x.md").exists()
    e = fake_run(tmp_path / "fewer", ids=range(9))
    with pytest.raises(runs.BadInput, match="another test items"):
        compare.compare([a, e])


def test_the_same_command_twice_gives_the_same_result(tmp_path):
    """`compare.py runs/*` writes runs/comparison.md and .json by default: given again, the glob also names
    those files, which are skipped with a note, as is a folder that is not a run; an unfinished run is
    refused before anything is written."""
    folder = tmp_path / "runs"
    fake_run(folder / "rrr", first=range(7), second=range(8))
    fake_run(folder / "grpo", method="grpo", first=range(10), second=range(10))
    (folder / "notes").mkdir()

    def compare_all():
        paths = sorted(str(p.relative_to(tmp_path)) for p in folder.iterdir())     # what the shell's runs/* gives
        done = subprocess.run([sys.executable, str(REPO / "compare.py"), *paths], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done, (folder / "comparison.md").read_text(), (folder / "comparison.json").read_text()
    first, second = compare_all(), compare_all()
    assert first[1:] == second[1:] and first[0].stdout == second[0].stdout
    assert "skipped runs/notes: not an rrr.py run folder" in first[0].stderr
    assert "skipped runs/comparison.json" in second[0].stderr and "skipped runs/comparison.md" in second[0].stderr
    assert json.loads(second[2])["n"] == 10 and len(json.loads(second[2])["runs"]) == 2
    (folder / "unfinished").mkdir()
    (folder / "unfinished" / "config.json").write_text("{}")
    (folder / "comparison.md").unlink()
    done = subprocess.run([sys.executable, str(REPO / "compare.py"), "runs/rrr", "runs/unfinished"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "runs/unfinished: no report.json (the run has not finished)" in done.stderr
    assert not (folder / "comparison.md").exists()


def test_config_file_with_a_flag_overriding_it(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"_note": "notes are skipped", "steps": 20, "max-completion-length": 64,
                                "bf16": True, "temperature": 0.7, "model": None}))
    cfg = runs.parse_config(Config, ["--config", str(path), "--steps", "3", "--no-bf16"])
    assert (cfg.steps, cfg.max_completion_length, cfg.bf16, cfg.temperature, cfg.model) == (3, 64, False, 0.7, None)
    for bad, message in [({"stepz": 1}, "unknown flag 'stepz'"), ({"steps": "x"}, "'steps' must be an integer"),
                         ({"bf16": 1}, "must be true or false"), ([1], "JSON object")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(runs.BadInput, match=message):
            runs.parse_config(Config, ["--config", str(path)])


def test_every_recipe_parses():
    recipes = sorted((REPO / "recipes").glob("*.json"))
    assert len(recipes) == 9
    for path in recipes:
        cfg = runs.parse_config(Config, ["--config", str(path)])
        assert cfg.model and cfg.out and cfg.beta == 0.001 and cfg.failure_samples == 64, path


def test_runs_from_other_warm_starts_are_refused_and_the_warm_start_is_named(tmp_path):
    """Two warm starts are two vanilla models: refused in one line. One shared warm start is named in the
    title as what the vanilla row is."""
    a = fake_run(tmp_path / "a", warm_start=800, first=range(5))
    b = fake_run(tmp_path / "b", warm_start=800, method="grpo", first=range(4))
    table, data = compare.compare([a, b])
    assert "after a labelled warm start (SFT on 800 answers)" in table.splitlines()[0] and data["shared_vanilla"]
    with pytest.raises(runs.BadInput, match="another warm start"):
        compare.compare([a, fake_run(tmp_path / "c", warm_start=400)])
    with pytest.raises(runs.BadInput, match="another warm start"):
        compare.compare([a, fake_run(tmp_path / "d")])


def test_mbpp_runs_also_show_mbpp_own_tests_alone(tmp_path):
    """With hidden tests the tries count visible and hidden tests; MBPP's own tests alone get their own
    columns (EvalPlus's base beside plus), from the items' rows."""
    a = fake_run(tmp_path / "rrr", task="mbpp", first=range(2), second=range(3),
                 base=((0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5), range(6), range(7)))
    text, numbers = compare.compare([a])
    header = text.splitlines()[4]
    assert header.endswith("| first try, MBPP's own tests | second try, MBPP's own tests |")
    trained = next(line for line in text.splitlines() if line.startswith(f"| {a} |"))
    assert trained.endswith(f"| {report.with_interval(6, 10)} | {report.with_interval(7, 10)} |")
    vanilla = next(line for line in text.splitlines() if line.startswith("| vanilla |"))
    assert vanilla.endswith(f"| {report.with_interval(5, 10)} | {report.with_interval(6, 10)} |")
    assert numbers["runs"][0]["first_base"] == 0.6 and numbers["runs"][0]["vanilla_second_base"] == 0.6
    # Countdown has no hidden tests: no such columns.
    assert "MBPP's own" not in compare.compare([fake_run(tmp_path / "cd", first=range(2))])[0]


def test_runs_written_before_the_tries_layout_compare_the_same(tmp_path):
    """eval_answers.jsonl rows written before `tries` named the two tries `first` and `second` (and
    `first_base`, `second_base`): such a run folder gives the same table and numbers."""
    settings = dict(task="mbpp", first=range(2), second=range(3),
                    base=((0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5), range(6), range(7)))
    today = fake_run(tmp_path / "today", **settings)
    old = fake_run(tmp_path / "old", **settings)
    rows = runs.read_jsonl(old / "eval_answers.jsonl")
    old_rows = [dict(id=r["id"], step=r["step"], first=r["tries"][0], second=r["tries"][1],
                     first_base=r["tries_base"][0], second_base=r["tries_base"][1]) for r in rows]
    (old / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    (text_a, numbers_a), (text_b, numbers_b) = compare.compare([today]), compare.compare([old])
    assert text_a.replace(str(today), "RUN") == text_b.replace(str(old), "RUN")
    assert json.dumps(numbers_a).replace(str(today), "RUN") == json.dumps(numbers_b).replace(str(old), "RUN")
    assert numbers_b["runs"][0]["first_base"] == 0.6


def test_a_run_that_changed_no_weight_is_named_so(tmp_path):
    """A run whose every step had a zero gradient is the initial model evaluated again: its row says so; a
    run with one step that had a gradient is not marked."""
    still = fake_run(tmp_path / "still", steps=2, grad_norms=[0.0, 0.0])
    moved = fake_run(tmp_path / "moved", steps=2, grad_norms=[0.0, 1e-9])
    table, data = compare.compare([still, moved])
    assert [r["name"] for r in data["runs"]] == [f"{still} (weights unchanged)", str(moved)]
    assert f"| {still} (weights unchanged) |" in table
