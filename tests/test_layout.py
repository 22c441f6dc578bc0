"""The repository's shape promises: every module reads in one sitting, and nothing points outside it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 520          # "under about 500 lines", with a little room for a docstring line or two


def tracked(*patterns) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:          # not a git checkout (an unpacked archive): every file below the root
        return [p for pattern in patterns for p in ROOT.rglob(pattern)]
    return [ROOT / line for line in out.stdout.splitlines()]


def test_every_module_is_under_about_500_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in tracked("*.py")}
    assert "rrr.py" in sizes and "rerest.py" in sizes
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_reference_to_notes_outside_the_repository():
    # Claims cite a paper or an issue, or state the fact; no file refers to background notes that only
    # the authors had (the name is spelled in two parts so that this file does not match itself).
    name = "RESEARCH" + ".md"
    hits = [p.relative_to(ROOT).as_posix() for p in tracked("*.py", "*.md", "*.json", "*.txt", "*.sh")
            if name in p.read_text(errors="replace")]
    assert hits == []


def test_ci_runs_the_readmes_test_command():
    """What a user runs is what CI runs: .ci/run's last line is the README's test command, character for
    character (before it, .ci/run only installs bubblewrap)."""
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme if line.startswith("    ") and line.strip().endswith("python -m pytest -q")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 1 and ci[-1] == commands[0]
    assert "tensorboard" in commands[0]      # else the TensorBoard tests skip for a user and run in CI
