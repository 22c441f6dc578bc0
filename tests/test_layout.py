"""The repository's shape promises: every module reads in one sitting, lines fit a screen, the README's
layout table names the files there are, and nothing points outside the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600          # what a reader holds in one sitting; a limit to read by, not to split modules for
MAX_WIDTH = 110          # characters per line of product code (everything but tests/ and bench/)


def tracked(*patterns) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:          # not a git checkout (an unpacked archive): every file below the root
        return [p for pattern in patterns for p in ROOT.rglob(pattern)]
    return [ROOT / line for line in out.stdout.splitlines()]


def product_modules() -> list[Path]:
    return [p for p in tracked("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", "bench")]


def test_every_module_reads_in_one_sitting():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in tracked("*.py")}
    assert "rrr.py" in sizes and "rerest.py" in sizes
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_product_lines_are_at_most_110_characters():
    long = [f"{p.relative_to(ROOT).as_posix()}:{n}" for p in product_modules()
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_WIDTH]
    assert long == []


def test_the_readmes_layout_table_names_the_files_there_are():
    """Each top-level product module and folder has a row in the README's layout table, and each row names
    a file or folder that exists."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    modules = {p.relative_to(ROOT).parts[0] for p in product_modules()}
    wanted = {m if m.endswith(".py") else m + "/" for m in modules} | {"tests/", "bench/", "recipes/", "docs/"}
    assert rows == wanted


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
