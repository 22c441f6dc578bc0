"""rrr.py's self-correction variants: --attempts K (more than one retry), --reflection-feedback (the
verifier's feedback in the reflection prompt), prompts replaced from the command line or --config, and
compare.py's per-try accounting."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import rrr
from report import mcnemar_exact, wilson_interval
from runs import parse_config, read_jsonl
from test_rrr import ENV, REPO, common_args, free_port, run_rrr
from tiny import PLANTED_PUZZLE
from verifiers import check_code, check_countdown

FIXTURE = Path(__file__).parent / "fixtures" / "rrr_two_attempts"
TIMES = ("sample_tokens_per_s", "train_tokens_per_s", "sample_seconds", "train_seconds", "step_seconds")


def planted_args(planted, out, **extra):
    """The settings FIXTURE was recorded with."""
    model, data = planted
    settings = dict(data_dir=data, steps=2, train_size=8, eval_size=4, batch_size=4, num_generations=4,
                    max_completion_length=16, learning_rate=1e-2, weight_decay=0, beta=0.01, log_episodes=100,
                    eval_every=1, seed=0)
    return common_args(model, out, **(settings | extra))


# Floats that come out of the update's arithmetic (sums over tokens, the gradient's norm) are compared to
# LOSS_REL: the same run on the two CPUs we see (AMD EPYC without AVX-512, which recorded FIXTURE, and Intel
# Xeon with AMX), fp32 on both, gives step 1's grad_norm 2.3996336460113525 and 2.3995649814605713 (2.9e-5
# relative; loss, ratio, KL and clip fraction equal); LOSS_REL leaves 35x that, while a change to what is
# trained or how it is weighted moves them by far more than 0.1%. Everything else is compared exactly.
LOSS_FLOATS = ("loss", "grad_norm", "clip_fraction", "mean_ratio", "mean_kl")
LOSS_REL = 1e-3


def same_values(got, want, where, rel=1e-9):
    """Equal: token ids, texts, rewards, counts exactly (floats that are ratios of counts, to 1e-9
    relative); the update's LOSS_FLOATS to LOSS_REL."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=1e-12), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            same_values(got[k], want[k], f"{where}.{k}", LOSS_REL if k in LOSS_FLOATS else rel)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            same_values(g, w, f"{where}[{i}]", rel)
    else:
        assert got == want, where


def before_the_first_update(rows):
    """The rows sampled from the initial weights: the step-0 evaluation, step 1's rollouts and update."""
    return [r for r in rows if r["step"] <= (0 if "first" in r or "tries" in r else 1)]


def in_tries_layout(row):
    """A FIXTURE row of eval_answers.jsonl, recorded when a row named its two tries `first` and `second`
    (solved after each; `first_base`, `second_base` by MBPP's visible tests), in today's layout: `tries`
    where `first` was, `tries_base` where `first_base` was, the same values."""
    renamed = {"first": "tries", "first_base": "tries_base"}
    return {renamed.get(k, k): [row[k], row[k.replace("first", "second")]] if k in renamed else v
            for k, v in row.items() if k not in ("second", "second_base")}


def same_shape(got, want, where):
    """Rows sampled after an update: the same steps, ids and fields; values not compared. Adam's first step
    moves every weight by about the learning rate whatever its gradient's size, so a gradient element near 0
    that rounds to the other sign on another CPU moves its weight by 2 x 1e-2 there: on the CPU with AMX,
    3 of step 2's 16 retries differ from FIXTURE's (their rewards do not)."""
    def shape(rows):
        return [(r["step"], r.get("id"), list(r)) for r in rows]
    assert shape(got) == shape(want), where


@pytest.mark.parametrize("flags", [[], ["--no-dynamic-sampling", "--max-num-gen-batches=2"]],
                         ids=["defaults", "dynamic-sampling-off"])
def test_two_attempts_reproduce_the_algorithm_before_attempts_existed(tmp_path, planted, flags):
    """--attempts 2 (the default) is the paper's algorithm as it was before --attempts existed: FIXTURE holds
    that version's evaluations, per-item answers, step metrics (less their timings) and episodes, recorded
    on an AMD EPYC CPU (fp32) from a fixed-seed run of the planted-reflection model with rewards in both
    steps. What was sampled before the first update is compared value by value (same_values), what came
    after it by its shape (same_shape): that is what holds on every CPU. --no-dynamic-sampling, whatever
    its cap, is the same run: the defaults' path."""
    out = tmp_path / "run"
    done = run_rrr(planted_args(planted, out) + flags)
    assert done.returncode == 0, done.stderr[-3000:]
    gained = {"eval_answers.jsonl": ("prompt",), "episodes.jsonl": ("scored_try",),    # fields added since
              "metrics.jsonl": ("learning_rate",), "evals.jsonl": ("tries",)}
    for name in ("evals.jsonl", "eval_answers.jsonl", "metrics.jsonl", "episodes.jsonl"):
        skip = TIMES + gained.get(name, ())
        got = [{k: v for k, v in r.items() if k not in skip} for r in read_jsonl(out / name)]
        want = read_jsonl(FIXTURE / name)
        if name == "eval_answers.jsonl":
            want = [in_tries_layout(r) for r in want]
        same_values(before_the_first_update(got), before_the_first_update(want), name)
        same_shape(got, want, name)
    assert [e["scored_try"] for e in read_jsonl(out / "episodes.jsonl")] == [2] * 32
    assert all(e["tries"] == [e["first"], e["second"]] for e in read_jsonl(out / "evals.jsonl"))
    assert [m["learning_rate"] for m in read_jsonl(out / "metrics.jsonl")] == [1e-2] * 2   # constant: the flag's
    assert 0 < sum(m["reward"] for m in read_jsonl(FIXTURE / "metrics.jsonl")) < 2     # rewards that vary
    assert "weights unchanged" not in (out / "report.md").read_text()          # a run that learned


def hand_advantages(rewards):
    """group_advantages' "group" scaling by hand: (r - mean) / (Bessel std + 1e-4), 0 for equal rewards."""
    if len(rewards) < 2 or max(rewards) == min(rewards):
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-4) for r in rewards]


@pytest.mark.parametrize("nproc", [1, 2])
def test_three_attempts_reward_each_reflection_by_the_retry_after_it(tmp_path, planted, nproc):
    """--attempts 3 on the planted model: a chain whose retry failed reflects on that retry and retries again.
    Checked from the logged episodes, by hand: each reward is the verifier's on the retry that follows the
    reflection; the third try's reflection is sampled after the failed retry it reflects on; advantages are
    group-normalised among the chains of one failure that reached the same try; the per-try rewards in
    metrics.jsonl and the evaluation's accuracy after each try agree with the logged rows. On 2 ranks,
    whose episode counts then differ, the update's collectives still line up (the run ends)."""
    out = tmp_path / "run"
    args = planted_args(planted, out, attempts=3, micro_batch_size=4)
    if nproc == 2:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "rrr.py")] + args
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    else:
        done = run_rrr(args)
    assert done.returncode == 0, done.stderr[-3000:]
    episodes, metrics = read_jsonl(out / "episodes.jsonl"), read_jsonl(out / "metrics.jsonl")
    third = [e for e in episodes if e["scored_try"] == 3]
    assert third, "no chain reached a third try"
    for e in episodes:      # the verifier's verdict on the retry after the reflection
        assert e["reward"] == float(check_countdown(e["text"]["retry"], PLANTED_PUZZLE["nums"], PLANTED_PUZZLE["target"]).ok)
    for e in third:      # the try reflected on is a retry that failed, and it is in the context
        assert not check_countdown(e["text"]["attempt"], PLANTED_PUZZLE["nums"], PLANTED_PUZZLE["target"]).ok
        assert e["text"]["attempt"].strip() in rrr_decoded(out, e)
    for step in (1, 2):
        rows = [e for e in episodes if e["step"] == step]
        for k in (2, 3):
            at_k = [e for e in rows if e["scored_try"] == k]
            for fid in {e["id"] for e in at_k}:      # the training ids are distinct within a step here
                group = [e for e in at_k if e["id"] == fid]
                assert [e["advantage"] for e in group] == pytest.approx(hand_advantages([e["reward"] for e in group]), abs=1e-5)
            m = next(m for m in metrics if m["step"] == step)
            assert m[f"reward_try{k}"] == pytest.approx(sum(e["reward"] for e in at_k) / max(len(at_k), 1))
        assert len([e for e in rows if e["scored_try"] == 2]) == 16 and len([e for e in rows if e["scored_try"] == 3]) <= 16
    for ev in read_jsonl(out / "evals.jsonl"):
        answers = [r for r in read_jsonl(out / "eval_answers.jsonl") if r["step"] == ev["step"]]
        for k in range(3):      # solved after try k: the verifier passes the attempt or a retry up to it
            texts = [[r["attempt"]] + [r["retry"]] * ("retry" in r) + [t["retry"] for t in r.get("later_tries", [])]
                     for r in answers]
            solved = [any(check_countdown(t, PLANTED_PUZZLE["nums"], PLANTED_PUZZLE["target"]).ok for t in ts[:k + 1])
                      for ts in texts]
            assert ev["tries"][k] == pytest.approx(sum(solved) / len(answers))
            assert [r["tries"][k] for r in answers] == solved


def rrr_decoded(out, episode):
    from model import load_tokenizer
    return load_tokenizer(json.loads((out / "config.json").read_text())["model"]).decode(episode["ids"])


def test_feedback_reaches_the_reflection_prompt_and_hidden_inputs_never_do():
    """--reflection-feedback: the reflection turn holds the verifier's feedback on the failed try; for MBPP
    only the visible tests' results, never the hidden tests (not their inputs, not their count)."""
    program = "```python\ndef double(x):\n    return x + 2\n```"
    verdict = check_code(program, ["assert double(2) == 4", "assert double(5) == 10"],
                         hidden=["assert double(918273) == 1836546"])
    assert not verdict.ok and "918273" not in verdict.feedback_to_show() and "hidden" in verdict.feedback
    assert "double(5)" in verdict.feedback_to_show()
    cfg = parse_config(rrr.Config, ["--task", "mbpp", "--reflection-feedback"])
    rrr.resolve_flags(cfg, rrr.run_folder(cfg))
    text = rrr.reflection_text(cfg, verdict.feedback_to_show())
    assert text.startswith(cfg.reflection_prompt) and verdict.feedback_to_show() in text
    assert "918273" not in text and "hidden" not in text
    plain = parse_config(rrr.Config, ["--task", "mbpp"])
    rrr.resolve_flags(plain, rrr.run_folder(plain))
    assert rrr.reflection_text(plain, verdict.feedback_to_show()) == plain.reflection_prompt      # the paper's, verbatim


def test_feedback_in_the_sequences_a_run_trains_on(tmp_path, planted):
    """End to end on Countdown: with --reflection-feedback every episode's reflection prompt, as recorded
    and as the tokens the update sees, carries the verifier's sentence on the try it reflects on."""
    out = tmp_path / "run"
    done = run_rrr(planted_args(planted, out, steps=1, eval_every=0) + ["--reflection-feedback"])
    assert done.returncode == 0, done.stderr[-3000:]
    failures = {r["id"]: r for r in read_jsonl(out / "failures.jsonl")[1:]}
    for e in read_jsonl(out / "episodes.jsonl"):
        feedback = failures[e["id"]]["feedback"]
        assert e["text"]["reflection_prompt"].endswith(f"Feedback on that answer: {feedback}")
        assert f"Feedback on that answer: {feedback}" in rrr_decoded(out, e)


def test_prompts_from_a_config_file_are_recorded_and_used(tmp_path, planted):
    config = tmp_path / "prompts.json"
    config.write_text(json.dumps(dict(reflection_prompt="Say in one line what went wrong.",
                                      retry_prompt="Answer again as <answer> EQUATION </answer>.")))
    out = tmp_path / "run"
    done = run_rrr(planted_args(planted, out, steps=1, eval_every=0) + ["--config", str(config)])
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["reflection_prompt"] == "Say in one line what went wrong."
    assert recorded["retry_prompt"] == "Answer again as <answer> EQUATION </answer>."
    for e in read_jsonl(out / "episodes.jsonl"):
        assert e["text"]["reflection_prompt"] == "Say in one line what went wrong."
        assert "Say in one line what went wrong." in rrr_decoded(out, e)
    # Without the flags the task's prompts are recorded, as used.
    default = parse_config(rrr.Config, ["--task", "countdown"])
    rrr.resolve_flags(default, rrr.run_folder(default))
    from data import get_task
    assert (default.reflection_prompt, default.retry_prompt) == (get_task("countdown").reflection_prompt,
                                                                 get_task("countdown").retry_prompt)


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize("where", ["flag", "config"])
def test_an_empty_prompt_is_refused_in_one_line(tmp_path, value, where):
    if where == "flag":
        args = [f"--retry-prompt={value}"]
    else:
        (tmp_path / "c.json").write_text(json.dumps(dict(reflection_prompt=value)))
        args = ["--config", str(tmp_path / "c.json")]
    done = subprocess.run([sys.executable, str(REPO / "rrr.py"), "--out", str(tmp_path / "out")] + args, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "prompt is empty" in done.stderr and not (tmp_path / "out").exists()


def fake_run(folder: Path, tries: dict, vanilla: dict, n=10, attempts=3, **cfg):
    """A finished run as compare.py reads it, with --attempts `attempts`: tries[k] (vanilla[k]) = the items
    (by index) that try k + 1 solves at the last (the vanilla) evaluation; solved stays solved."""
    folder.mkdir(parents=True)
    config = dict(task="countdown", model=None, method="rrr", reflection="model", attempts=attempts, **cfg)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "report.json").write_text(json.dumps(dict(config=config, trained=dict(step=4))))
    rows = []
    for step, solved_by in ((0, vanilla), (4, tries)):
        for i in range(n):
            after = [any(i in solved_by[j] for j in range(k + 1)) for k in range(attempts)]
            rows.append(dict(id=f"q{i}", step=step, first=after[0], second=after[1]) | (dict(tries=after) if attempts > 2 else {}))
    (folder / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_per_try_accuracy_intervals_and_tests_of_a_hand_built_run(tmp_path):
    """Three tries, counted by hand: the vanilla model solves items 0-1 at the first try, 2 at the second, 3
    at the third (2, 3, 4 solved after each); the trained one solves 0-3 first, 4-5 second, 6-8 third (4, 6, 9)."""
    vanilla = {0: {0, 1}, 1: {2}, 2: {3}}
    a = fake_run(tmp_path / "three", {0: {0, 1, 2, 3}, 1: {4, 5}, 2: {6, 7, 8}}, vanilla)
    b = fake_run(tmp_path / "two", {0: {0, 1, 2}, 1: {3}}, vanilla, attempts=2)
    table, data = compare.compare([a, b])
    assert data["shared_vanilla"]       # the two-try run's vanilla evaluation is the first two tries of the other's
    three, two = data["runs"]
    assert three["tries"] == [0.4, 0.6, 0.9] and two["tries"] == [0.3, 0.4]
    assert three["intervals"][2] == pytest.approx(wilson_interval(9, 10))
    # Against vanilla (2, 3, 4 solved): gains only, 2, 3 and 5 of them.
    assert [(c["gained"], c["lost"]) for c in three["changes"]] == [(2, 0), (3, 0), (5, 0)]
    assert three["changes"][2]["p_value"] == pytest.approx(mcnemar_exact(5, 0)) == pytest.approx(2 / 32)
    # Each try against the one before: 2 more items at try 2, 3 more at try 3.
    assert [(c["gained"], c["lost"]) for c in three["successive"]] == [(2, 0), (3, 0)]
    assert three["method"] == "RRR, model reflection, 3 tries" and two["method"] == "RRR, model reflection"
    header = table.splitlines()[4]
    assert "third try" in header and "third try vs vanilla" in header
    assert "| vanilla | - | 0 | 20.0% [5.7, 51.0] | 30.0% [10.8, 60.3] | 40.0% [16.8, 68.7] |" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {b} |"))
    assert row.count("| - |") == 2          # no third try, nor its change
    # Feedback in the reflection prompt changes the vanilla model's second try: each run is paired with its own.
    c = fake_run(tmp_path / "feedback", {0: {0, 1}, 1: {2, 3, 4}}, {0: {0, 1}, 1: {2, 3}}, attempts=2, reflection_feedback=True)
    table, data = compare.compare([a, c])
    assert not data["shared_vanilla"] and "(its vanilla)" in table
    assert data["runs"][1]["method"] == "RRR, model reflection, feedback in the reflection prompt"
    assert [(ch["gained"], ch["lost"]) for ch in data["runs"][1]["changes"]] == [(0, 0), (1, 0)]


@pytest.mark.parametrize("control", [["--reflection", "generic"], ["--method", "grpo"]])
def test_the_controls_take_the_variants(tmp_path, planted, control):
    """--reflection generic and --method grpo with three tries and feedback: the generic control trains its
    retries (a third try included, after the fixed reflection); plain GRPO trains first attempts and is
    evaluated after each of the three tries."""
    out = tmp_path / "run"
    done = run_rrr(planted_args(planted, out, steps=1, eval_every=0, attempts=3) + ["--reflection-feedback"] + control)
    assert done.returncode == 0, done.stderr[-3000:]
    episodes = read_jsonl(out / "episodes.jsonl")
    assert all(len(ev["tries"]) == 3 for ev in read_jsonl(out / "evals.jsonl"))
    for e in episodes:
        trained = rrr_decoded_span(out, e)
        if control[0] == "--method":
            assert e["scored_try"] == 1 and trained.strip() == e["text"]["attempt"].strip()
        else:
            assert e["scored_try"] in (2, 3) and trained.strip() == e["text"]["retry"].strip()
            assert rrr.GENERIC_REFLECTION in rrr_decoded(out, e)
    if control[0] == "--reflection":
        assert any(e["scored_try"] == 3 for e in episodes)


def rrr_decoded_span(out, episode):
    from model import load_tokenizer
    tok = load_tokenizer(json.loads((out / "config.json").read_text())["model"])
    return tok.decode(episode["ids"][episode["span"][0]:episode["span"][1]], skip_special_tokens=True)
