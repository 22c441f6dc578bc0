"""Failures of the machinery are not failures of the program: failures injected into the sandbox (no
process, a process that dies before the program runs) give verdicts marked infra, which earn nothing
either way, sit out their GRPO group, get no loss, are left out of accuracy and counted in the reports;
more than a tenth of a batch stops the run with one line. A program cannot make itself unjudged."""

import errno
import json
import os
import subprocess

import pytest
import torch

import compare
import parallel as par
import rerest
import rrr
import sandbox
from data import get_task
from grpo import group_advantages
from report import rerest_report
from runs import main_guard, parse_config
from test_compare import fake_run
from test_rrr import common_args
from tiny import save_tiny_chat_model
from runs import InfrastructureError
from verifiers import MAX_NOT_JUDGED, Verdict, check_code, check_code_batch, stop_if_unjudged

TESTS = ["assert f(3) == 9"]
RIGHT, WRONG = "def f(x):\n    return x * x", "def f(x):\n    return 0"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def failing_popen(monkeypatch, failing_calls):
    """subprocess.Popen as the sandbox calls it, raising EAGAIN (out of processes) on the calls numbered in
    `failing_calls`."""
    real, calls = subprocess.Popen, []

    def popen(*args, **kwargs):
        calls.append(len(calls))
        if calls[-1] in failing_calls:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kwargs)
    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    return calls


def test_a_process_that_cannot_start_is_not_judged_and_tried_once_more(monkeypatch):
    # One worker: calls 0-2 are the three programs in order, then the retries of those that failed.
    sandbox.isolation()                                   # its probe is a process too: made before the count
    before = open_descriptors()
    calls = failing_popen(monkeypatch, {1, 3})           # the wrong program, twice: not judged
    got = check_code_batch([(RIGHT, TESTS, ""), (WRONG, TESTS, ""), (WRONG, TESTS, "")], workers=1)
    assert len(calls) == 4
    assert [(v.ok, v.infra) for v in got] == [(True, False), (False, True), (False, False)]
    assert got[1].feedback.startswith("not judged: the sandbox could not start a process")
    assert "Resource temporarily unavailable" in got[1].feedback
    assert got[2].feedback != got[1].feedback and "output: 0" in got[2].feedback
    assert open_descriptors() == before                  # the pipe of a process that never started is closed

    calls = failing_popen(monkeypatch, {0})              # a shortage that passes: the retry judges it
    again = check_code_batch([(RIGHT, TESTS, ""), (WRONG, TESTS, "")], workers=1)
    assert len(calls) == 3 and [(v.ok, v.infra) for v in again] == [(True, False), (False, False)]


def test_a_process_that_dies_before_the_program_runs_is_not_judged(monkeypatch):
    # As bwrap refusing to make namespaces, or Python failing to start, looks from the parent.
    monkeypatch.setattr(sandbox, "_child_source", lambda: "import os\nos._exit(7)")
    for hidden in (None, ["assert f(4) == 16"]):
        verdict = check_code(RIGHT, TESTS, hidden=hidden)
        assert (verdict.ok, verdict.infra, verdict.base) == (False, True, None)
        assert "before the program ran" in verdict.feedback


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)",                              # exits before any test
    "raise SystemExit(1)\ndef f(x):\n    return x * x",
    "x = ' ' * (1 << 34)",                                   # the memory limit
    "import os, sys\nos.close(int(sys.argv[1]))\ndef f(x):\n    return 9",     # the report descriptor, after "started"
    "while True:\n    pass",                                 # the timeout
])
def test_a_program_cannot_make_itself_unjudged(program):
    verdict = check_code(program, TESTS, timeout=2.0)
    assert not verdict.ok and not verdict.infra


def test_more_than_a_tenth_of_a_batch_unjudged_stops_it():
    judged, unjudged = Verdict(True, "ok"), Verdict(False, "not judged: no process", infra=True)
    allowed = int(20 * MAX_NOT_JUDGED)                      # 2 of 20
    assert stop_if_unjudged([unjudged] * allowed + [judged] * (20 - allowed))[0].infra
    with pytest.raises(InfrastructureError, match="3 of 20 programs of a batch could not be run.*no process"):
        stop_if_unjudged([unjudged] * (allowed + 1) + [judged] * (19 - allowed))


def test_the_task_reward_path_stops_on_a_failing_sandbox(monkeypatch):
    task = get_task("mbpp")
    examples = task.load("train", size=3, seed=0)            # hidden tests made (and cached) before the injection
    monkeypatch.setattr(sandbox, "_child_source", lambda: "import os\nos._exit(7)")
    with pytest.raises(InfrastructureError, match="3 of 3 programs"):
        task.check_batch(["x"] * 3, examples)


def test_an_unjudged_episode_sits_out_its_group():
    # The reference: the group's advantages computed without the unjudged episode, by hand.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, True, True, True, True, True])
    got = group_advantages(rewards, 4, valid=valid)
    kept = torch.tensor([1.0, 0.0, 0.0])                     # mean 1/3, std (Bessel) sqrt(1/3)
    expected = (kept - 1 / 3) / ((1 / 3) ** 0.5 + 1e-4)
    assert got[[0, 1, 3]] == pytest.approx(expected.tolist(), abs=1e-6) and got[2] == 0.0
    assert got[4:].tolist() == group_advantages(rewards[4:], 4).tolist()
    # A group left with one judged episode has no signal.
    assert group_advantages(torch.tensor([1.0, 0.0]), 2, valid=torch.tensor([True, False])).tolist() == [0.0, 0.0]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), seed=3)


def test_an_unjudged_episode_gets_no_loss(tiny_chat, tmp_path):
    """The update with an unjudged episode equals the update without its tokens mattering: changing its
    advantage and tokens changes nothing, while the same change to a judged episode does."""
    cfg = parse_config(rrr.Config, common_args(tiny_chat, tmp_path, beta=0.01, num_generations=3))

    def update(advantage, tokens, judged):
        episodes = [rrr.Episode("q", [11, 12, 13, 40, 41], (3, 5), 1.0, False, 2, advantage=0.7),
                    rrr.Episode("q", [11, 12, 13, 50, 51, 52], (3, 6), 0.0, False, 3, advantage=-0.7),
                    rrr.Episode("q", [11, 12, 13] + tokens, (3, 3 + len(tokens)), 0.0, False, len(tokens),
                                advantage=advantage, judged=judged)]
        d = par.init_distributed("cpu")
        try:
            pol = rrr.load_policy(cfg, d)
            stats = rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
            return stats, {k: par.full_tensor(v.detach()).clone() for k, v in pol.model.state_dict().items()}
        finally:
            par.close_distributed()

    (a, wa), (b, wb) = update(0.0, [60, 61], False), update(5.0, [70, 71], False)
    assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    (c, _), (e, _) = update(0.0, [60, 61], True), update(5.0, [70, 71], True)
    assert c["loss"] != e["loss"]


def test_rrr_stops_with_one_line_when_the_sandbox_fails(tiny_chat, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RRR_DATA_DIR", raising=False)          # the offline sample
    get_task("mbpp").load("train", size=1, seed=0)            # its hidden tests are made before the injection
    monkeypatch.setattr(sandbox, "_child_source", lambda: "import os\nos._exit(7)")
    with pytest.raises(SystemExit) as stopped:
        main_guard(rrr.run, common_args(tiny_chat, tmp_path / "run", task="mbpp", steps=1, eval_size=2, train_size=2))
    assert stopped.value.code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "programs of a batch could not be run" in err[0] and "--resume" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reports_leave_unjudged_items_out_and_count_them(tmp_path):
    # compare.py: q9 unjudged at the trained evaluation is left out of both; 9 items remain.
    folder = fake_run(tmp_path / "rrr", first=range(7), second=range(8))
    rows = [json.loads(line) for line in (folder / "eval_answers.jsonl").read_text().splitlines()]
    for r in rows:
        if r["id"] == "q9" and r["step"] == 8:
            r.update(judged=False, first=False, second=False)
    (folder / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, data = compare.compare([folder])
    assert data["n"] == 9 and data["runs"][0]["first"] == pytest.approx(7 / 9)
    assert data["runs"][0]["change_first"]["n"] == 9

    # rerest's report: a row missing a problem the sandbox could not run is paired on the others.
    keys = [f"mbpp-{i}" for i in range(10)]
    base = {k: i == 0 for i, k in enumerate(keys)}
    trained = {k: i < 5 for i, k in enumerate(keys) if i != 3}
    cfg = parse_config(rerest.Config, ["--task", "mbpp", "--data-dir", "/real/data"])
    text, _, summary = rerest_report(cfg, {"base": dict(items=base, time=1.0),
                                           "Re-ReST": dict(items=trained, time=1.0, not_judged=1)}, {}, 500)
    change = summary["rows"]["Re-ReST"]["pass1"]["change"]
    assert (change["n"], change["gained"], change["lost"]) == (9, 3, 0)
    assert "Not judged (the sandbox could not run the program" in text and "Re-ReST, 1 problems" in text


def test_hidden_tests_are_not_made_from_a_failing_sandbox(monkeypatch):
    from data.mbpp_hidden import make_hidden_tests
    row = dict(task_id=1, code="def f(x):\n    return x * x", tests=["assert f(3) == 9"], setup="")
    assert make_hidden_tests([row], progress=False)["1"]            # a working sandbox makes some
    monkeypatch.setattr(sandbox, "_child_source", lambda: "import os\nos._exit(7)")
    with pytest.raises(InfrastructureError, match="could not run 1 reference programs"):
        make_hidden_tests([row], progress=False)
