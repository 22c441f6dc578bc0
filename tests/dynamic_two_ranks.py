"""Run by tests/test_dynamic_sampling.py under torchrun (2 CPU processes, gloo):

    dynamic_two_ranks.py MODEL OUT

failures.dynamic_sampling on scripted draws (G = 2, --batch-size 2: one failure per rank and draw) in
which rank 1 ends with no group to train: draw 0 has one group with differing rewards (rank 0's), draw 1
two (one per rank), so the draws hold 3 and the first 2 in (draw, rank, position) order are rank 0's.
Then policy.grpo_update on what each rank kept (rank 1: nothing). Rank 0 writes to OUT both ranks'
results, the update's stats and its own episodes, for the test to replay in one process.
"""

import json
import sys
from dataclasses import asdict

import parallel as par
import rrr
from failures import dynamic_sampling
from runs import parse_config

model_dir, out = sys.argv[1], sys.argv[2]
d = par.init_distributed("cpu")
cfg = parse_config(rrr.Config, [f"--model={model_dir}", "--no-bf16", "--beta=0.01", "--num-generations=2",
                                "--batch-size=2", "--micro-batch-size=2", "--max-num-gen-batches=3",
                                "--no-gradient-checkpointing", "--dynamic-sampling"])
REWARDS = {(0, 0): [1.0, 0.0], (1, 0): [0.0, 0.0], (0, 1): [0.0, 1.0], (1, 1): [1.0, 0.0]}   # (rank, draw)
asked = []


def draw(k):
    asked.append(k)
    prompt = [5, 6, 7, 8 + k]
    return [rrr.Episode(f"rank{d.rank}-draw{k}", prompt + [11 + r, 12, 13], (4, 7), reward, False, 3,
                        advantage=reward - 0.5, failure=0)
            for r, reward in enumerate(REWARDS[d.rank, k])]


episodes, drawn = dynamic_sampling(cfg, d, draw)
pol = rrr.load_policy(cfg, d)
stats = rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
ranks = par.all_gather_objects(dict(asked=asked, drawn=drawn, kept=[e.id for e in episodes]), d)
if d.main:
    rrr.Path(out).write_text(json.dumps(dict(ranks=ranks, stats=stats, episodes=[asdict(e) for e in episodes])))
par.barrier()
par.close_distributed()
