"""runs.py: flags from a dataclass's real types, one-line flag errors, --report-to (TensorBoard read back
by its own reader; W&B faked or absent), and the report's PNG plots (pixel size from the IHDR chunk)."""

# String annotations on purpose: parse_config must resolve them to real types, not read their text.
from __future__ import annotations

import json
import struct
import sys
import types
from dataclasses import dataclass

import pytest

import report
import runs
from runs import BadInput, flag


@dataclass
class Cfg:
    fast: bool = flag(True, "a switch that is on by default")
    bf16: bool | None = flag(None, "on, off, or decided later (default: by device)")
    steps: int = flag(3, "an integer")
    rate: float = flag(0.5, "a number")
    mode: str = flag("a", "a choice", choices=["a", "b"])
    model: str | None = flag(None, "an optional string")
    eps: float | None = flag(None, "an optional number")
    task: list[str] | None = flag(None, "repeatable", choices=["x", "y", "z"])
    ids: list[int] | None = flag(None, "repeatable integers")


def test_flags_follow_the_real_types():
    cfg = runs.parse_config(Cfg, ["--no-fast", "--bf16", "--steps", "7", "--rate", "1e-3", "--mode", "b",
                                  "--model", "m", "--eps=0.25", "--task", "x", "--task", "z", "--ids", "4", "--ids", "-2"])
    assert cfg == Cfg(fast=False, bf16=True, steps=7, rate=1e-3, mode="b", model="m", eps=0.25, task=["x", "z"], ids=[4, -2])
    assert type(cfg.steps) is int and type(cfg.rate) is float and type(cfg.ids[0]) is int
    assert runs.parse_config(Cfg, []) == Cfg()
    assert runs.parse_config(Cfg, ["--no-bf16", "--fast"]).bf16 is False
    assert runs.parse_config(Cfg, ["--rate", "2"]).rate == 2.0
    assert runs.flag_kinds(Cfg)["bf16"] == ("bool", bool) and runs.flag_kinds(Cfg)["ids"] == ("list", int)


def test_unsupported_type_is_a_bug_not_bad_input():
    with pytest.raises(TypeError, match="unsupported flag type"):
        runs.flag_kind(dict[str, int])
    with pytest.raises(TypeError, match="only X | None"):
        runs.flag_kind(int | str)


@pytest.mark.parametrize("argv, message", [(["--steps", "x"], "argument --steps: invalid int value: 'x'"),
                                           (["--stepz", "1"], "unrecognized arguments: --stepz 1"),
                                           (["--mode", "c"], "argument --mode: invalid choice: 'c'"),
                                           (["--task", "w"], "argument --task: invalid choice: 'w'"),
                                           (["--no-steps"], "unrecognized arguments: --no-steps")])
def test_flag_errors_are_one_line(argv, message, capsys):
    with pytest.raises(BadInput) as e:
        runs.parse_config(Cfg, argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert capsys.readouterr().err == ""         # no usage block printed by argparse
    # Through main_guard: one line on stderr and exit code 2, as for every other bad input.
    with pytest.raises(SystemExit) as exit_:
        runs.main_guard(lambda args: runs.parse_config(Cfg, args), argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        runs.parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--fast, --no-fast" in out and "--bf16, --no-bf16" in out
    for shown in ["(default: on)", "(default: 3)", "(default: 0.5)", "--mode {a,b}", "(default: a)",
                  "--task {x,y,z}", "repeatable; repeatable (default: none)", "(default: by device)"]:
        assert shown in out, shown
    # Every flag states its default: given, or "none" when the help text does not explain a None.
    assert out.count("(default: none)") == 4     # model, eps, task, ids


def test_config_file_uses_the_same_types(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"fast": False, "rate": 2, "task": ["y", "x"], "ids": [1, 2], "model": "-dash",
                                "bf16": None, "_note": "skipped"}))
    cfg = runs.parse_config(Cfg, ["--config", str(path), "--task", "z"])
    assert (cfg.fast, cfg.rate, cfg.task, cfg.ids, cfg.model, cfg.bf16) == (False, 2.0, ["y", "x", "z"], [1, 2], "-dash", None)
    for bad, message in [({"ids": ["1"]}, "'ids' must be a list of integers"), ({"task": "x"}, "must be a list of strings"),
                         ({"rate": True}, "'rate' must be a number"), ({"steps": 1.5}, "'steps' must be an integer"),
                         ({"fast": "yes"}, "true or false"), ({"steps": None}, "cannot be null"),
                         ({"mode": "c"}, "invalid choice: 'c'")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(BadInput, match=message):
            runs.parse_config(Cfg, ["--config", str(path)])


# --- --report-to ---------------------------------------------------------------------------------------

def test_report_to_none_and_other_ranks_write_nothing(tmp_path):
    for report_to, main in [("none", True), ("tensorboard", False)]:
        if report_to == "tensorboard":
            pytest.importorskip("tensorboard")
        tracker = runs.open_tracker(report_to, tmp_path, {}, main)
        tracker.log({"reward": 1.0}, 1)
        tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInput, match="choose one of none, tensorboard, wandb"):
        runs.open_tracker("mlflow", tmp_path, {}, True)


def test_tensorboard_events_read_back_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = runs.open_tracker("tensorboard", tmp_path, dict(steps=2), True)
    tracker.log({"reward": 0.25, "train/loss": 1.5, "note": "text", "finished": True, "n": 3}, 1)
    tracker.log({"reward": 0.75, "train/loss": 0.5}, 2)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["n", "reward", "train/loss"]    # numbers only, no bools
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.5), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("n")] == [(1, 3.0)]


@pytest.mark.parametrize("main", [True, False])
def test_missing_wandb_is_one_line_with_the_install_command(tmp_path, monkeypatch, main):
    monkeypatch.setitem(sys.modules, "wandb", None)      # import wandb now fails, installed or not
    with pytest.raises(BadInput) as e:
        runs.open_tracker("wandb", tmp_path, {}, main)   # every rank stops, not rank 0 alone
    assert "pip install wandb" in str(e.value) and "\n" not in str(e.value)


def test_missing_tensorboard_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(BadInput, match="pip install tensorboard"):
        runs.open_tracker("tensorboard", tmp_path, {}, True)


def test_wandb_gets_project_dir_config_and_numbers_only(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda metrics, step: calls.append(("log", metrics, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert calls == [] and runs.open_tracker("wandb", tmp_path, dict(a=1), False).log({"x": 1}, 1) is None
    tracker = runs.open_tracker("wandb", tmp_path, dict(steps=2), True, project="rerest")
    tracker.log({"reward": 0.5, "note": "text", "ok": False, "kl": 1e-3}, 4)
    tracker.log({"note": "only text"}, 5)
    tracker.close()
    tracker.close()
    assert calls == [("init", dict(project="mine", dir=str(tmp_path), config=dict(steps=2))),
                     ("log", {"reward": 0.5, "kl": 1e-3}, 4), ("finish",)]


# --- plots ---------------------------------------------------------------------------------------------

def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, which must come first after the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def expected(figsize) -> tuple[int, int]:
    return round(figsize[0] * report.PLOT_DPI), round(figsize[1] * report.PLOT_DPI)


def test_rrr_plot_is_a_png_of_the_chosen_size(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = [dict(step=s, reward=s / 10, zero_variance_groups=1 - s / 10, mean_kl=s * 1e-4, trained_length=30 + s)
               for s in range(1, 6)]
    evals = [dict(step=0, first=0.1, second=0.2), dict(step=5, first=0.2, second=0.4)]
    assert expected(report.RRR_FIGSIZE) == (1500, 450)
    for name, m, e in [("full", metrics, evals), ("no-steps", [], evals[:1]), ("nothing", [], []),
                       ("no-kl", [dict(step=1, reward=0.0, zero_variance_groups=1.0)], evals)]:
        path = tmp_path / f"{name}.png"
        report.plot_rrr(path, m, e, title=name)
        assert png_size(path) == expected(report.RRR_FIGSIZE), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.png", "no-kl.png", "no-steps.png", "nothing.png"]


def test_rerest_plot_is_a_png_of_the_chosen_size(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {"base": 0.1, "Re-ReST": 0.2, "Re-ReST + trained reflector": None, "DPO": 0.0}
    report.plot_rerest(tmp_path / "sc.png", rows, {"base": 0.3, "Re-ReST": None, "Re-ReST + trained reflector": None, "DPO": 0.5})
    report.plot_rerest(tmp_path / "plain.png", rows)
    report.plot_rerest(tmp_path / "none.png", {"base": None})
    for name in ("sc", "plain", "none"):
        assert png_size(tmp_path / f"{name}.png") == expected(report.REREST_FIGSIZE) == (1000, 500)


def test_runs_recorded_by_an_older_version_are_refused_in_one_line(tmp_path):
    """config.json written before the run folder was recorded holds null for it: --resume refuses such a
    folder in one line that names the setting, instead of guessing. The embedded model's names (null:
    --model not given) are one model, never another."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(model=None, out=None, steps=8, seed=0)))
    with pytest.raises(runs.BadInput, match=f"out: None -> '{out}'") as e:
        runs.prepare_out(out, dict(model="SmolLM2-135M-Instruct", out=str(out), steps=9, seed=0), resume=True)
    assert "\n" not in str(e.value) and "model" not in str(e.value)
    (out / "config.json").write_text(json.dumps(dict(model=None, out=str(out), steps=8, seed=0)))
    assert runs.prepare_out(out, dict(model="SmolLM2-135M-Instruct", out=str(out), steps=9, seed=0), resume=True)
    with pytest.raises(runs.BadInput, match=r"older version \(no attempts recorded\)") as e:   # a setting added since
        runs.prepare_out(out, dict(model=None, out=str(out), steps=8, seed=0, attempts=2), resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(runs.BadInput, match="model: None -> 'Qwen/Qwen2.5-1.5B-Instruct'"):
        runs.prepare_out(out, dict(model="Qwen/Qwen2.5-1.5B-Instruct", out=str(out), steps=8, seed=0), resume=True)
    with pytest.raises(runs.BadInput, match="seed"):
        runs.prepare_out(out, dict(model=None, out=str(out), steps=8, seed=1), resume=True)


def test_resume_accepts_the_run_folder_named_another_way(tmp_path, monkeypatch):
    """A run started with a relative --out continues under its absolute path or through a link to a folder
    above it; another folder's path is another setting."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "runs").symlink_to(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "a"
    (out / "config.json").write_text(json.dumps(dict(out="runs/a", seed=0)))
    for now in (str(out), str(tmp_path / "elsewhere" / "runs" / "a"), "runs/a/"):
        assert runs.prepare_out(out, dict(out=now, seed=0), resume=True)
    with pytest.raises(runs.BadInput, match="out: 'runs/a' -> 'runs/b'"):
        runs.prepare_out(out, dict(out="runs/b", seed=0), resume=True)


@pytest.mark.parametrize("device, amx, expected", [("cpu", False, False), ("cpu", True, True), ("cuda", False, True)])
def test_bf16_default_follows_the_hardware(monkeypatch, device, amx, expected):
    """--bf16's default where it is not given: on with CUDA and on CPUs with AMX (measured faster), off on
    other CPUs (measured slower): read from the CPU's features, so one machine always chooses alike."""
    import torch
    import parallel as par
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg = types.SimpleNamespace(bf16=None, batch_size=2)
    runs.resolve_machine_flags(cfg, par.Dist(0, 1, torch.device(device)))
    assert cfg.bf16 is expected
    given = types.SimpleNamespace(bf16=False, batch_size=2)
    runs.resolve_machine_flags(given, par.Dist(0, 1, torch.device(device)))
    assert given.bf16 is False


# A bad flag or value of every script, and the start of its one line.
BAD_COMMAND_LINES = [
    (["rrr.py", "--task", "nosuch"], "error: argument --task: invalid choice"),
    (["rrr.py", "--steps", "0"], "error: --steps must be at least 1"),
    (["rrr.py", "--model", "./no-such-model"], "error: no such folder"),
    (["rrr.py", "--data-dir", "/no/such/folder"], "error: data folder"),
    (["rrr.py", "--task", "mbpp", "--warm-start", "10"], "error: --warm-start needs a task with a solver"),
    (["rrr.py", "--warm-start-reflections"], "error: --warm-start-reflections needs --warm-start N"),
    (["rrr.py", "--task", "gsm8k", "--eval-split", "dev"], "error: --eval-split dev: task gsm8k has no dev split"),
    (["rrr.py", "--resume", "--out", "/no/such/run"], "error: --resume: no run to continue in /no/such/run"),
    (["rrr.py", "--warmup-ratio", "0.1"], "error: --warmup-ratio needs --lr-scheduler-type linear or cosine"),
    (["rrr.py", "--lr-scheduler-type", "cosine", "--warmup-ratio", "1"], "error: --warmup-ratio must be in [0, 1)"),
    (["rerest.py", "--k", "0"], "error: --k must be at least 1"),
    (["rerest.py", "--task", "mbpp", "--warm-start", "10"], "error: --warm-start needs a task with a solver"),
    (["rerest.py", "--warmup-ratio", "0.5"], "error: --warmup-ratio needs --lr-scheduler-type linear or cosine"),
    (["rerest.py", "--task", "countdown", "--self-consistency", "3"], "error: --self-consistency votes"),
    (["warmstart.py", "--puzzles", "0"], "error: --puzzles must be at least 1"),
    (["warmstart.py", "--lr-scheduler-type", "linear", "--warmup-ratio", "-0.1"], "error: --warmup-ratio must be in"),
    (["compare.py", "/no/such/run"], "error: /no/such/run"),
]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_is_transformers_schedulers(kind):
    """apply_lr_schedule's rate at every step of many (total steps, warmup ratio) pairs equals the one that
    transformers' get_scheduler sets on an optimizer, with TrainingArguments' warmup steps (ceil of the ratio
    times the total; its "constant" has no warmup)."""
    import math

    import torch
    from transformers import get_scheduler
    for total in range(1, 41):
        for ratio in ([0.0] if kind == "constant" else [0.0, 0.1, 0.25, 0.5, 0.99]):
            cfg = types.SimpleNamespace(learning_rate=3e-4, lr_scheduler_type=kind, warmup_ratio=ratio)
            reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
            scheduler = get_scheduler(kind, reference, num_warmup_steps=math.ceil(total * ratio),
                                      num_training_steps=total)
            ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            for step in range(total):
                want = reference.param_groups[0]["lr"]
                assert runs.apply_lr_schedule(ours, cfg, step, total) == want, (total, ratio, step)
                assert ours.param_groups[0]["lr"] == want
                reference.step()
                scheduler.step()


@pytest.mark.parametrize("argv, message", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_lines_fail_before_torch_loads(argv, message):
    """One line and exit code 2, without importing torch (which alone takes 2-5 s): the script is run as
    __main__ in a fresh interpreter that reports whether torch was loaded when it exited."""
    import subprocess
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    probe = ("import runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_path({script!r}, run_name='__main__')\n"
             "finally:\n    print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe.format(argv=argv, script=str(root / argv[0]))], cwd=root,
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout.strip() == "no torch"
    assert seconds < 2.0, f"{seconds:.1f} s"


# Every command line a script's --help shows (its docstring's `python X.py ...` and `torchrun ... X.py ...`
# lines) must work as written: each is parsed by the parser of the script it runs, and rrr.py's and
# rerest.py's are checked by check_flags as a run checks them. Hub ids are accepted without asking the hub
# (none is reachable here); everything else is checked for real, run from the repository's root.
HELP_SCRIPTS = ["rrr.py", "rerest.py", "warmstart.py", "compare.py", "bench/gpu.py", "bench/grpo_step.py",
                "bench/hidden_tests.py", "bench/learning.py", "bench/op_counts.py", "bench/sampler.py",
                "bench/step_parts.py", "bench/verifiers.py"]


def help_examples() -> list[tuple[str, str, list[str]]]:
    import ast
    import shlex
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    found = []
    for name in HELP_SCRIPTS:
        for line in (ast.get_docstring(ast.parse((root / name).read_text())) or "").splitlines():
            if line.strip().startswith(("python ", "torchrun ")):
                words = shlex.split(line, comments=True)
                script = next(w for w in words if w.endswith(".py"))
                found.append((name, script, words[words.index(script) + 1:]))
    return found


def parse_example(script: str, args: list[str]):
    import importlib
    if script in ("rrr.py", "rerest.py"):
        module = importlib.import_module(script[:-3])
        return module.check_flags(runs.parse_config(module.Config, args))
    module = importlib.import_module(script[:-3].replace("/", "."))
    if hasattr(module, "parse_args"):
        return module.parse_args(args)
    return module.parser().parse_args(args)


@pytest.mark.parametrize("where, script, args", help_examples(),
                         ids=[f"{w}: {s} {' '.join(a)}" for w, s, a in help_examples()])
def test_every_help_example_works_as_written(where, script, args, monkeypatch):
    from pathlib import Path
    import rerest
    import rrr
    import warmstart
    real = runs.check_model_name

    def offline(name):
        is_hub_id = name is not None and name.count("/") == 1 and not name.startswith((".", "/", "~"))
        return None if is_hub_id else real(name)
    for module in (rrr, rerest, warmstart):
        monkeypatch.setattr(module, "check_model_name", offline)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.delenv("RRR_DATA_DIR", raising=False)
    parse_example(script, args)


def test_the_config_example_in_help_is_accepted_by_both_scripts(tmp_path, capsys, monkeypatch):
    """--config's help shows a JSON example; both scripts take it as written."""
    import rerest
    import rrr
    monkeypatch.setenv("COLUMNS", "400")        # one help line per flag: no wrapping inside the example
    example = tmp_path / "example.json"
    example.write_text(runs.CONFIG_EXAMPLE)
    for module in (rrr, rerest):
        with pytest.raises(SystemExit):
            runs.parse_config(module.Config, ["--help"])
        assert runs.CONFIG_EXAMPLE in " ".join(capsys.readouterr().out.split())
        cfg = runs.parse_config(module.Config, ["--config", str(example)])
        assert (cfg.model, cfg.seed) == ("Qwen/Qwen2.5-1.5B-Instruct", 1)
