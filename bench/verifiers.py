"""MBPP programs checked per second with verifiers.check_code_batch (a fresh process per program), each
with its visible and its hidden tests (data/mbpp_hidden.py), as the reward runs them.

Running time with the defaults: about 4-7 minutes on a 2-core AMD EPYC CPU (A in BENCHMARKS.md), with
bubblewrap; no model, so no dtype. An estimate: 2 repeats of the 6 timed sets of 974 programs at the
programs/s BENCHMARKS.md measured on A on two days (with --repeats 1).

    python bench/verifiers.py                          # ../shared/data/mbpp/mbpp.jsonl, all 974 reference programs
    python bench/verifiers.py --data-dir ../shared/data --workers 2 --repeats 3

Three sets: the reference solutions (typical passing programs); the same programs with their body
broken so that every assert fails (typical failing programs, with feedback); and a mix of half and half.
Each set runs isolated (bubblewrap, when sandbox.isolation() finds it) and with process limits only.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench._cli import Help  # noqa: E402
import runs  # noqa: E402
import sandbox  # noqa: E402
from data import get_task  # noqa: E402
from verifiers import check_code_batch  # noqa: E402


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--data-dir", default=os.environ.get("RRR_DATA_DIR", str(shared)),
                    help="folder holding mbpp/mbpp.jsonl: $RRR_DATA_DIR if set, else ../shared/data "
                         "beside the repository")
    ap.add_argument("--workers", type=int, default=None,
                    help="parallel sandboxes; None: one per CPU core this process may use")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per set (best is kept)")
    ap.add_argument("--visible-only", action="store_true", help="leave out the hidden tests (the reward before them)")
    return ap


def main():
    args = parser().parse_args()
    path = Path(args.data_dir) / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        sys.exit(f"error: {path} not found (pass --data-dir)")
    task = get_task("mbpp")
    rows = [ex.reference for split in task.splits for ex in task.load(split, data_dir=args.data_dir)]
    passing = [(r["code"], r["tests"], r["setup"], [] if args.visible_only else r["hidden"]) for r in rows]
    # Every function returns None: the asserts run and fail, with feedback.
    failing = [("\n".join(line if not line.lstrip().startswith("return") else line[:len(line) - len(line.lstrip())] + "return None"
                          for line in code.splitlines()), tests, setup, hidden) for code, tests, setup, hidden in passing]
    mixed = [p if i % 2 else f for i, (p, f) in enumerate(zip(passing, failing))]
    hidden = sum(len(h) for *_, h in passing)
    print(f"{len(rows)} programs ({sum(len(r['tests']) for r in rows)} visible and {hidden} hidden tests), {args.workers or runs.local_share_of_cores()} workers, {os.cpu_count()} cores")
    print(sandbox.isolation()[1])
    for isolated in (True, False) if sandbox.isolation()[0] else (False,):
        sandbox.USE_ISOLATION = isolated
        for name, items in (("passing", passing), ("failing", failing), ("mixed", mixed)):
            best, ok = 0.0, 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                verdicts = check_code_batch(items, workers=args.workers)
                best = max(best, len(items) / (time.perf_counter() - start))
                ok = sum(v.ok for v in verdicts)
            label = "isolated" if isolated else "limits only"
            print(f"{label:>11} {name:>8}: {best:6.1f} programs/s ({ok} of {len(items)} pass)")

if __name__ == "__main__":
    main()
