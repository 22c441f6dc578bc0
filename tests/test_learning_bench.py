"""bench/learning.py's tables, from run folders written here by hand (no model runs): the sweep's change from
the warm start and the final stage's pooled table count the items a hand count gives, with the exact McNemar
p-value computed here from the binomial distribution."""

import json
import sys
from math import comb

import pytest
from tiny import REPO

sys.path.insert(0, str(REPO))
from bench import learning  # noqa: E402


def two_sided_binomial(b: int, c: int) -> float:
    n = b + c
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def write_run(folder, first: dict, second: dict, minutes: float):
    """A finished run: evaluations at steps 0 and 10, {step: [solved per item]} for each try."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")
    (folder / "bench_minutes.json").write_text(json.dumps(dict(minutes=minutes)))
    answers = [dict(step=s, id=f"p{i}", first=f, second=sec, attempt="<answer> 1 + 2 </answer>")
               | ({} if f else dict(reflection="r", retry="<answer> 2 + 1 </answer>"))
               for s in (0, 10) for i, (f, sec) in enumerate(zip(first[s], second[s]))]
    (folder / "eval_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    evals = [dict(step=s, first=sum(first[s]) / len(first[s]), second=sum(second[s]) / len(second[s]))
             for s in (0, 10)]
    (folder / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(dict(step=s, reward=0.1, zero_variance_groups=0.5))
                                                  + "\n" for s in range(1, 11)))


def test_sweep_table_counts_gains_and_losses_against_the_warm_start(tmp_path, monkeypatch):
    # 12 items: at step 10, 7 gained and 1 lost on the first try; the second try unchanged.
    before = [0] * 10 + [1, 1]
    after = [1] * 7 + [0] * 3 + [1, 0]
    name = next(iter(learning.SWEEP))
    write_run(tmp_path / "runs" / "sweep" / name, {0: before, 10: after}, {0: before, 10: before}, 12.3)
    monkeypatch.setattr(learning, "machine", lambda bf16: "test machine")
    learning.main(["--stage", "sweep", "--configs", name, "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results")])
    table = (tmp_path / "runs" / "sweep" / "sweep.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
    assert f"+7/−1, {two_sided_binomial(1, 7):.3g}" in row and "+0/−0, 1 " in row
    assert "16.7% → 66.7%" in row and "| 12 |" in row
    saved = json.loads((tmp_path / "results" / "sweep.json").read_text())
    assert saved["configs"][name]["minutes"] == 12.3 and len(saved["runs"][name]["answers"]) == 24
    assert (tmp_path / "results" / "sweep.png").exists()
    # A stopped run is tabulated too, marked unfinished; --table-only runs nothing.
    other = list(learning.SWEEP)[1]
    write_run(tmp_path / "runs" / "sweep" / other, {0: before, 10: before}, {0: before, 10: before}, 3.0)
    (tmp_path / "runs" / "sweep" / other / "report.json").unlink()
    learning.main(["--stage", "sweep", "--table-only", "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results")])
    table = (tmp_path / "runs" / "sweep" / "sweep.md").read_text()
    assert f"| {other} | {learning.SWEEP[other][0]} | 10 of {learning.SWEEP[other][1]} (unfinished) | 3 |" in table
    assert f"| {name} " in table and not (tmp_path / "runs" / "sweep" / other / "config.json").exists()


def test_final_pooled_table_counts_items_over_seeds(tmp_path, monkeypatch):
    """Two seeds' GRPO runs on 4 items: an item is gained when its mean outcome over the seeds is above its
    vanilla outcome, lost when below; the p-value is the exact sign test of the two counts."""
    monkeypatch.setattr(learning, "machine", lambda bf16: "test machine")
    args = learning.parse_args(["--stage", "final", "--arms", "rrr", "grpo", "--seeds", "0", "1",
                                "--out", str(tmp_path)])
    logs = {}
    vanilla = [1, 1, 0, 0, 0]
    for seed, after in ((0, [1, 0, 1, 1, 0]), (1, [1, 0, 1, 0, 0])):
        for arm in ("rrr", "grpo"):
            folder = tmp_path / f"seed-{seed}" / arm
            write_run(folder, {0: vanilla, 10: after}, {0: vanilla, 10: after}, 1.0)
            logs[f"seed-{seed}/{arm}"] = learning.run_log(folder)
    table = learning.pooled_table(args, logs)
    row = next(line for line in table.splitlines() if line.startswith("| GRPO on first attempts | first"))
    # item 0 kept, item 1 lost in both seeds, item 2 gained in both, item 3 in one seed (mean 0.5 > 0): gained
    # 2, lost 1; 2/5 solved before, (1 + 0 + 1 + 0.5 + 0)/5 = 50% after.
    assert "| 5 | 2 | 40.0% | 50.0% | +2/−1 |" in row
    assert row.endswith(f"| {two_sided_binomial(1, 2):.3g} |")


@pytest.mark.parametrize("argv, message", [
    (["--stage", "final", "--arms", "grpo", "rrr"], "--arms must start with rrr"),
    (["--stage", "sweep", "--eval-every", "0"], "--eval-every must be at least 1"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        learning.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_kept_adapters_are_fp16_with_the_header_rrr_wrote(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    gen = torch.Generator().manual_seed(0)
    weights = {"layers.0.q_proj.lora_A": torch.randn(4, 8, generator=gen),
               "layers.0.q_proj.lora_B": torch.randn(8, 4, generator=gen) * 1e-3}
    header = {"r": "4", "alpha": "8", "targets": "q_proj"}
    save_file(weights, tmp_path / "a.safetensors", metadata=header)
    warm = dict(description="a warm start", folder="countdown_easy-800-0123456789")
    (tmp_path / "config.json").write_text(json.dumps(dict(warm_start_model=warm)))
    learning.keep_adapters(tmp_path / "a.safetensors", tmp_path / "kept" / "a.safetensors")
    with safe_open(str(tmp_path / "kept" / "a.safetensors"), "pt") as f:
        assert f.metadata() == dict(header, warm_start_model='"countdown_easy-800-0123456789"')
    kept = load_file(tmp_path / "kept" / "a.safetensors")
    for name, w in weights.items():
        assert kept[name].dtype == torch.float16
        assert torch.allclose(kept[name].float(), w, rtol=5e-4, atol=3e-8)     # fp16: 11 bits; subnormal below 6e-5
    with pytest.raises(SystemExit, match="missing"):
        learning.keep_adapters(tmp_path / "none.safetensors", tmp_path / "kept" / "b.safetensors")


def test_rerest_stage_tests_rerest_against_self_training_on_the_same_puzzles(tmp_path, monkeypatch):
    # A finished rerest.py run (report.json as report.py writes it) is kept; 10 puzzles: Re-ReST solves 5
    # that self-training does not and misses 1 that it solves.
    folder = tmp_path / "runs" / "rerest" / "seed-3"
    folder.mkdir(parents=True)
    ids = [f"p{i}" for i in range(10)]
    selftrain = dict(zip(ids, [False] * 5 + [True] + [False] * 4))
    rerest = dict(zip(ids, [True] * 5 + [False] + [False] * 4))
    base = dict.fromkeys(ids, False)
    rows = {"base": dict(items=base), "self-training": dict(items=selftrain), "Re-ReST": dict(items=rerest)}
    (folder / "report.json").write_text(json.dumps(dict(rows=rows, sizes={"Re-ReST": [1, 6]})))
    monkeypatch.setattr(learning, "machine", lambda bf16: "test machine")
    learning.main(["--stage", "rerest", "--seeds", "3", "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "rerest.json").read_text())["seeds"]["3"]
    change = saved["rerest_vs_self_training"]
    assert (change["gained"], change["lost"]) == (5, 1)
    assert change["p_value"] == pytest.approx(two_sided_binomial(1, 5))
    assert saved["rows"]["Re-ReST"] == rerest and saved["minutes"] is None


def test_final_stage_tabulates_every_finished_arm_of_each_seed(tmp_path, monkeypatch):
    """Seed 0 finished all four arms before; `--seeds 0 1 --arms rrr grpo` (seed 1's arms already finished
    too) runs nothing, compares all four arms of seed 0 and two of seed 1, and pools each arm over the
    seeds that have it."""
    vanilla, after = [1, 0, 0, 0], [1, 1, 0, 0]
    for seed, arms in ((0, learning.ARMS), (1, ["rrr", "grpo"])):
        for arm in arms:
            write_run(tmp_path / "runs" / "final" / f"seed-{seed}" / arm, {0: vanilla, 10: after},
                      {0: vanilla, 10: after}, 1.0)
    compared, kept = [], []
    monkeypatch.setattr(learning, "machine", lambda bf16: "test machine")
    monkeypatch.setattr(learning, "compare", lambda folders: (compared.append([f.name for f in folders]),
                                                               ("table", {}))[1])
    monkeypatch.setattr(learning, "keep_adapters", lambda source, target: kept.append(target.name))
    monkeypatch.setattr(learning.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was run again"))
    learning.main(["--stage", "final", "--seeds", "0", "1", "--arms", "rrr", "grpo",
                   "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert compared == [list(learning.ARMS), ["rrr", "grpo"]]
    assert len(kept) == 6 and sorted(json.loads((tmp_path / "results" / "final.json").read_text())["runs"]) == \
        sorted([f"seed-0/{a}" for a in learning.ARMS] + ["seed-1/rrr", "seed-1/grpo"])
    pooled = (tmp_path / "runs" / "final" / "pooled.md").read_text()
    seeds_of = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in pooled.splitlines()
                if line.startswith("| ") and "| first |" in line}
    assert seeds_of == {learning.LABELS["rrr"]: "2", learning.LABELS["feedback"]: "1",
                        learning.LABELS["generic"]: "1", learning.LABELS["grpo"]: "2"}


def test_retries_table_counts_repeats_and_fixes_of_failed_first_tries(tmp_path):
    """Step 0: 3 failed first tries, one retry repeats its equation (spaces aside), one fixes it; the
    solved and the unjudged items are not failures. Step 20: 1 failure, fixed."""
    rows = [dict(step=0, id="a", first=False, second=False, attempt="<answer> (1 + 2) * 3 </answer>",
                 retry="<answer>(1+2)*3</answer>"),
            dict(step=0, id="b", first=False, second=True, attempt="<answer> 1 + 2 </answer>",
                 retry="<answer> 3 * 1 </answer>"),
            dict(step=0, id="c", first=False, second=False, attempt="no answer", retry="<answer> 3 </answer>"),
            dict(step=0, id="d", first=True, second=True, attempt="<answer> 9 </answer>"),
            dict(step=0, id="e", first=False, second=False, attempt="x", retry="x", judged=False),
            dict(step=10, id="a", first=False, second=False, attempt="<answer> 1 </answer>", retry="<answer> 1 </answer>"),
            dict(step=20, id="a", first=False, second=True, attempt="<answer> 1 </answer>", retry="<answer> 2 </answer>")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = learning.retries_table({"r": tmp_path / "run"})
    assert "| r | 0 | 3 | 1 | 1 (33.3%) |" in table and "| r | 20 | 1 | 0 | 1 (100.0%) |" in table
    assert "| r | 10 |" not in table
