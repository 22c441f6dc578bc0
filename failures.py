"""RRR's step 3, the failure set: first attempts at each training query until one fails (up to
--failure-samples), kept with that attempt and the verifier's feedback. Written to failures.jsonl chunk by
chunk after a meta line of the settings it depends on, so that an interrupted run resumes it exactly and
another run can reuse it (--failure-set) only when it was built the same way.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

import parallel as par
from model import chat_ids
from policy import sample, sampling, stop_of
from runs import BadInput, read_jsonl, setting_differs

SEED_FAILURE_SET = 1        # the failure set's seed purpose (par.sampling_generator); rrr.py's rollouts: 2


@dataclass
class Failure:
    id: str                    # the training example
    attempt: list[int]         # the failed first attempt, as sampled
    attempt_stop: int | None   # the stop token that ended it (None: cut at max length)
    feedback: str              # the verifier's verdict on it
    feedback_shown: str        # what --reflection-feedback shows of it (Verdict.feedback_to_show)
    samples: int               # first attempts drawn until this one failed


def failure_set_meta(cfg) -> dict:
    """The settings a failure set depends on: its first line, which a run reusing or resuming it matches."""
    return dict(task=cfg.task, model=cfg.model, warm_start=cfg.warm_start, data_dir=cfg.data_dir,
                train_size=cfg.train_size, seed=cfg.seed, failure_samples=cfg.failure_samples,
                max_completion_length=cfg.max_completion_length, temperature=cfg.temperature)


def check_failure_set(cfg, path: Path, train):
    """Refuses, in one line, a failure set at `path` whose meta line shows other settings than this run's;
    another run's (--failure-set) must also hold every training query. Only reads: run() checks
    --failure-set with it before the run folder exists, so a refused run creates and changes nothing."""
    if cfg.failure_set and not path.is_file():
        raise BadInput(f"--failure-set {path}: no such file")
    try:
        rows = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot be read ({type(e).__name__})") from None
    if not rows and not cfg.failure_set:
        return
    theirs, ours = rows[0].get("meta") if rows and isinstance(rows[0], dict) else None, failure_set_meta(cfg)
    if not isinstance(theirs, dict):
        raise BadInput(f"{path}: not a failure set (its first line is not a meta line)")
    changed = sorted(k for k in set(theirs) | set(ours) if setting_differs(k, theirs.get(k), ours.get(k)))
    if changed:
        what = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in changed)
        raise BadInput(f"{path} was built with other settings ({what})")
    if any(isinstance(r, dict) and r.get("failed") and "feedback_shown" not in r for r in rows[1:]):
        raise BadInput(f"{path} was written by an older version (no feedback_shown): delete it to rebuild it")
    have = {r.get("id") for r in rows[1:] if isinstance(r, dict)}
    missing = sum(ex.id not in have for ex in train)
    if missing and cfg.failure_set:  # a run killed while building it: resume that run, or build one here
        raise BadInput(f"--failure-set {path} lacks {missing} of this run's {len(train)} training queries")


def sample_until_failure(cfg, pol, task, examples, gen) -> list[dict]:
    """First attempts at each example in rounds of 1, 2, 4, ... per example that has not failed yet, up to
    --failure-samples in all: its first failed attempt (with the verifier's feedback and the number of
    attempts drawn), or failed=False."""
    found, used = {}, {ex.id: 0 for ex in examples}
    pending, n = list(examples), 1
    while pending:
        n = min(n, cfg.failure_samples - used[pending[0].id])
        prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in pending]
        g = sample(pol.sampler, pol.stops, prompts, cfg, temperature=cfg.temperature, num_samples=n,
                   generator=gen)
        verdicts = task.check_batch([pol.decode(t) for t in g.tokens],
                                    [ex for ex in pending for _ in range(n)])
        for i, ex in enumerate(pending):
            for j in range(n):
                r = i * n + j
                if not verdicts[r].ok and not verdicts[r].infra and ex.id not in found:
                    v = verdicts[r]
                    found[ex.id] = dict(id=ex.id, failed=True, attempt=g.tokens[r], feedback=v.feedback,
                                        feedback_shown=v.feedback_to_show(),
                                        attempt_stop=stop_of(g.tokens[r], g.finished[r]),
                                        samples=used[ex.id] + j + 1)
            used[ex.id] += n
        pending = [ex for ex in pending if ex.id not in found and used[ex.id] < cfg.failure_samples]
        n *= 2
    return [found.get(ex.id, dict(id=ex.id, failed=False, samples=used[ex.id])) for ex in examples]


@torch.no_grad()
def build_failure_set(cfg, d, pol, task, train, out) -> list[Failure]:
    """Samples first attempts per training query until one fails (sample_until_failure) and keeps the
    queries that failed, with that attempt. Written to failures.jsonl chunk by chunk (--sampling-batch-size
    queries per rank), after a meta line of the settings it depends on. par.resumable_chunks numbers the
    chunks alike in every run, and a chunk's sampling seed is its number: an interrupted run resumes where it
    stopped and samples each chunk exactly as an uninterrupted run does."""
    path = Path(cfg.failure_set) if cfg.failure_set else out / "failures.jsonl"
    par.on_rank0(d, check_failure_set, cfg, path, train)          # rank 0 reads, and refuses for all

    def work(number, ids, examples):       # a chunk's sampling seed is its number
        gen = par.sampling_generator(cfg.seed, d, SEED_FAILURE_SET, number)
        return sample_until_failure(cfg, pol, task, examples, gen)

    with sampling(pol):
        done = par.resumable_chunks(path, [(ex.id, ex) for ex in train], work, d=d,
                                    per_rank=cfg.sampling_batch_size, desc="failure set",
                                    header=dict(meta=failure_set_meta(cfg)), key="id")
    rows = [done[ex.id][0] for ex in train]
    return [Failure(id=r["id"], attempt=r["attempt"], attempt_stop=r["attempt_stop"], feedback=r["feedback"],
                    feedback_shown=r["feedback_shown"], samples=r["samples"]) for r in rows if r["failed"]]
