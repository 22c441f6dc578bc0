"""RRR's step 3, the failure set: first attempts at each training query until one fails (up to
--failure-samples), kept with that attempt and the verifier's feedback. Written to failures.jsonl chunk by
chunk after a meta line of the settings it depends on, so that an interrupted run resumes it exactly and
another run can reuse it (--failure-set) only when it was built the same way. Then which of its failures
each training step takes: step_batch, and with --dynamic-sampling, dynamic_sampling's draws.
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
    """The settings a failure set depends on: its first line, which a run reusing or resuming it matches.
    warm_start_reflections only when set, so that the failure sets written before it existed still match."""
    return dict(task=cfg.task, model=cfg.model, warm_start=cfg.warm_start, data_dir=cfg.data_dir,
                train_size=cfg.train_size, seed=cfg.seed, failure_samples=cfg.failure_samples,
                max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                **({"warm_start_reflections": True} if cfg.warm_start_reflections else {}))


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


# --- which failures a step trains on -------------------------------------------------------------------

def step_batch(cfg, d, failures, index) -> list[Failure]:
    """This rank's share of the failures of batch `index` (the step; with --dynamic-sampling, draw k of step s
    is batch s x --max-num-gen-batches + k): a seeded permutation per epoch, so the data position is a
    function of the index alone."""
    n, B = len(failures), cfg.batch_size
    picked = []
    for k in range(index * B, (index + 1) * B):
        epoch, i = divmod(k, n)
        picked.append(failures[par.epoch_order(n, cfg.seed, epoch)[i]])
    share = B // d.world
    return picked[d.rank * share:(d.rank + 1) * share]


def differing_failures(episodes) -> set[int]:
    """The failures (Episode.failure) with a group whose rewards differ: among the judged episodes of one
    failure and one try, the largest reward is above the smallest. The rewards themselves are compared, not
    a float std, which can come out above 0 for equal rewards."""
    rewards = {}
    for e in episodes:
        if e.judged:
            rewards.setdefault((e.failure, e.scored_try), []).append(e.reward)
    return {f for (f, _), r in rewards.items() if max(r) != min(r)}


def share_of_last_draw(counts: list[int], before: int, batch_size: int, rank: int) -> int:
    """How many of this rank's differing groups in a step's last draw are trained when the draws found more
    than --batch-size: the first --batch-size in (draw, rank, position) order. counts: each rank's in the
    last draw; before: all ranks' in the earlier draws."""
    return max(0, min(counts[rank], batch_size - before - sum(counts[:rank])))


def dynamic_sampling(cfg, d, draw) -> tuple[list, dict]:
    """--dynamic-sampling (DAPO, arXiv 2503.14476): draw(k) -> this rank's episodes of the step's draw k
    (--batch-size failures over all ranks, G rollouts each, advantages computed per group before any is
    dropped; with --scale-rewards batch the std is the draw's). Draws until --batch-size groups over all
    ranks have rewards that differ, or --max-num-gen-batches draws. Returns this rank's episodes of the
    groups trained (those, --batch-size at most; when no draw had one, the first draw's: all with equal
    rewards, so the update has the KL term alone, as a step without the flag whose groups all had equal
    rewards) and the draws' metrics, summed over the ranks."""
    B, draws, kept, totals = cfg.batch_size, [], 0, [0.0, 0.0, 0.0]
    while len(draws) < cfg.max_num_gen_batches and kept < B:
        episodes = draw(len(draws))
        draws.append((episodes, differing_failures(episodes)))
        # Every rank makes this call once per draw and gets the same sums: all stop at the same draw.
        found, *sums = par.all_sum([len(draws[-1][1]), sum(e.reward for e in episodes),
                                    sum(e.judged for e in episodes), sum(e.sampled for e in episodes)], d)
        kept, totals = kept + int(found), [t + s for t, s in zip(totals, sums)]
    if kept > B:
        counts = par.all_gather_objects(len(draws[-1][1]), d)
        last, mine = draws[-1]
        draws[-1] = last, set(sorted(mine)[:share_of_last_draw(counts, kept - sum(counts), B, d.rank)])
    trained = [e for episodes, mine in draws for e in episodes if e.failure in mine] if kept else draws[0][0]
    return trained, dict(gen_batches=len(draws), groups_drawn=len(draws) * B, groups_kept=min(kept, B) or B,
                         reward_drawn=totals[0] / max(totals[1], 1), sampled_tokens_all_draws=int(totals[2]))
