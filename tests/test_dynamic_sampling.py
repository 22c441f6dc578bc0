"""--dynamic-sampling (DAPO's dynamic sampling, failures.dynamic_sampling): which groups a step keeps, in what
order, when it stops drawing, and that a rank left with nothing to train still runs the update."""

import json
import random
import subprocess
import sys

import pytest
import torch

import parallel as par
import rrr
from failures import differing_failures, dynamic_sampling, share_of_last_draw
from runs import parse_config, read_jsonl
from test_attempts import planted_args
from test_rrr import ENV, REPO, free_port, run_rrr
from tiny import PLANTED_PUZZLE, save_tiny_chat_model
from verifiers import check_countdown


def episode(failure, reward, scored_try=2, judged=True, sampled=3):
    return rrr.Episode(f"f{failure}", [1, 2, 3], (2, 3), reward, False, sampled, judged=judged,
                       scored_try=scored_try, failure=failure)


def test_a_failure_is_kept_when_its_judged_rewards_differ_at_some_try():
    """By hand: 0 is flat at try 2 and differs at try 3; 1 differs at try 2; 2 differs only through an
    unjudged episode (whose reward does not count); 3 is flat at both tries; 4's rewards are equal floats
    whose float32 std is above 0 (a std test would keep it)."""
    same = [0.7] * 8
    assert torch.tensor(same).std().item() > 0          # the premise: a std is no test of equal rewards
    episodes = ([episode(0, 0.0), episode(0, 0.0), episode(1, 1.0), episode(1, 0.0),
                 episode(2, 1.0), episode(2, 0.0, judged=False), episode(3, 1.0), episode(3, 1.0)]
                + [episode(4, r) for r in same]
                + [episode(0, 1.0, 3), episode(0, 0.0, 3), episode(3, 0.0, 3), episode(3, 0.0, 3)])
    assert differing_failures(episodes) == {0, 1}


def test_a_cap_below_one_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "rrr.py"), "--out", str(tmp_path / "out"), "--dynamic-sampling",
                           "--max-num-gen-batches", "0"], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "error: --max-num-gen-batches must be at least 1"
    assert not (tmp_path / "out").exists()


def test_the_last_draw_is_cut_in_draw_rank_position_order():
    """share_of_last_draw against the rule spelled out: line up the last draw's groups rank by rank, take
    as many as the earlier draws left room for, and count each rank's."""
    rng = random.Random(0)
    for _ in range(500):
        world, batch = rng.randint(1, 4), rng.randint(1, 8)
        before = rng.randint(0, batch - 1)
        counts = [rng.randint(0, 4) for _ in range(world)]
        taken = [r for r in range(world) for _ in range(counts[r])][:batch - before]
        assert [share_of_last_draw(counts, before, batch, r) for r in range(world)] == \
            [taken.count(r) for r in range(world)]


@pytest.mark.parametrize("script, kept, used", [
    # each draw: the rewards of its 3 groups of G = 2; kept: (draw, group) trained; used: draws made
    ([[[1, 0], [1, 1], [0, 0]], [[0, 1], [1, 1], [1, 0]]], [(0, 0), (1, 0), (1, 2)], 2),     # 3: enough
    ([[[1, 0], [0, 0], [0, 0]], [[1, 0], [0, 1], [1, 0]]], [(0, 0), (1, 0), (1, 1)], 2),     # 4: cut to 3
    ([[[0, 0], [0, 0], [0, 0]], [[0, 0], [0, 1], [0, 0]], [[1, 1], [1, 1], [1, 1]]], [(1, 1)], 3),  # cap
    ([[[0, 0], [0, 0], [0, 0]], [[1, 1], [1, 1], [1, 1]], [[0, 0], [0, 0], [0, 0]]],
     [(0, 0), (0, 1), (0, 2)], 3),                       # none differ: the first draw's, as without the flag
])
def test_one_rank_draws_until_enough_groups_differ_or_the_cap(monkeypatch, script, kept, used):
    monkeypatch.setattr(par, "all_sum", lambda values, d: [float(v) for v in values])       # one rank
    monkeypatch.setattr(par, "all_gather_objects", lambda obj, d: [obj])
    cfg = parse_config(rrr.Config, ["--batch-size=3", "--num-generations=2", "--max-num-gen-batches=3"])
    asked, made = [], {}

    def draw(k):
        asked.append(k)
        made[k] = [episode(g, float(r), sampled=10 * k + g) for g, rewards in enumerate(script[k]) for r in rewards]
        return made[k]

    trained, drawn = dynamic_sampling(cfg, par.Dist(0, 1, torch.device("cpu")), draw)
    assert asked == list(range(used))
    assert [id(e) for e in trained] == [id(e) for k, g in kept for e in made[k] if e.failure == g]
    everything = [e for k in asked for e in made[k]]
    assert drawn == dict(gen_batches=used, groups_drawn=3 * used, groups_kept=len(kept),
                         reward_drawn=sum(e.reward for e in everything) / len(everything),
                         sampled_tokens_all_draws=sum(e.sampled for e in everything))


def test_a_rank_that_keeps_no_group_still_runs_the_update(tmp_path):
    """Two ranks (dynamic_two_ranks.py): rank 1 keeps no group, yet both ranks make the same draws and the
    update ends (the stand-in micro-batches of policy.micro_batches); its loss and gradient norm are those
    of one process updating on rank 0's episodes alone."""
    model = save_tiny_chat_model(tmp_path / "tiny", seed=3)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "dynamic_two_ranks.py"), str(model), str(out)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    first, second = result["ranks"]
    assert first["asked"] == second["asked"] == [0, 1] and first["drawn"] == second["drawn"]
    assert first["drawn"]["groups_kept"] == 2 and first["drawn"]["gen_batches"] == 2
    assert first["kept"] == ["rank0-draw0"] * 2 + ["rank0-draw1"] * 2 and second["kept"] == []
    cfg = parse_config(rrr.Config, [f"--model={model}", "--no-bf16", "--beta=0.01", "--num-generations=2",
                                    "--micro-batch-size=2", "--no-gradient-checkpointing"])
    episodes = [rrr.Episode(**dict(e, span=tuple(e["span"]))) for e in result["episodes"]]
    d = par.init_distributed("cpu")
    try:
        stats = rrr.grpo_update(cfg, d, rrr.load_policy(cfg, d), episodes, rrr.trained_length_limit(cfg))
    finally:
        par.close_distributed()
    assert result["stats"]["loss"] == pytest.approx(stats["loss"], rel=1e-4, abs=1e-7)
    assert result["stats"]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-4)
    assert stats["grad_norm"] > 0


# Seeds whose draws hold more than --batch-size groups with differing rewards at some step, so the last draw is cut.
@pytest.mark.parametrize("nproc, seed", [(1, 0), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_trained_groups_are_the_first_with_differing_rewards_of_the_draws(tmp_path, planted, nproc, seed):
    """The planted-reflection model, G = 2, --batch-size 4, a cap of 3 draws, learning rate 0 (the model
    never changes): draw k of step s must be exactly what step s x 3 + k samples without the flag. From
    such a run (the reference) the trained groups and the draws' metrics are computed by hand: the draws
    up to the first that brings --batch-size groups with differing rewards (or the cap), and of their
    differing groups the first --batch-size in (draw, rank, position) order. On 2 ranks this also says
    that both ranks stopped at the same draw, and the run ends."""
    cap, steps, G, B = 3, 2, 2, 4
    same = dict(num_generations=G, learning_rate=0, weight_decay=0, eval_every=0, eval_size=2, log_episodes=1000,
                seed=seed)
    on, off = tmp_path / "on", tmp_path / "off"
    done = run_rrr(planted_args(planted, on, steps=steps, max_num_gen_batches=cap, **same) + ["--dynamic-sampling"],
                   nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_rrr(planted_args(planted, off, steps=steps * cap, **same), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    reference, trained = read_jsonl(off / "episodes.jsonl"), read_jsonl(on / "episodes.jsonl")
    metrics, share, cut = read_jsonl(on / "metrics.jsonl"), B // nproc, False
    for e in trained:       # the reward is the verifier's on the retry
        assert e["reward"] == float(check_countdown(e["text"]["retry"], PLANTED_PUZZLE["nums"], PLANTED_PUZZLE["target"]).ok)
    for m in metrics:
        s = m["step"] - 1
        # Draw k: the reference's step s x cap + k, B groups of G logged rank by rank.
        draws = [[[e for e in reference if e["step"] == s * cap + k + 1][g * G:(g + 1) * G] for g in range(B)]
                 for k in range(cap)]
        differ = [[(k, g // share, g % share, group) for g, group in enumerate(groups)
                   if len({e["reward"] for e in group}) > 1] for k, groups in enumerate(draws)]
        used = next((k + 1 for k in range(cap) if sum(map(len, differ[:k + 1])) >= B), cap)
        cut = cut or sum(map(len, differ[:used])) > B
        chosen = [c for cs in differ[:used] for c in cs][:B] or [(0, g // share, g % share, group)
                                                                for g, group in enumerate(draws[0])]
        chosen.sort(key=lambda c: (c[1], c[0], c[2]))      # the log holds rank 0's episodes, then rank 1's
        want = [{k: v for k, v in e.items() if k != "step"} for *_, group in chosen for e in group]
        got = [{k: v for k, v in e.items() if k != "step"} for e in trained if e["step"] == m["step"]]
        assert got == want, m["step"]
        drawn = [e for groups in draws[:used] for group in groups for e in group]
        assert (m["gen_batches"], m["groups_drawn"], m["groups_kept"]) == (used, used * B, len(chosen))
        assert m["reward_drawn"] == pytest.approx(sum(e["reward"] for e in drawn) / len(drawn))
        assert m["sampled_tokens_all_draws"] == sum(e["sampled"] for e in drawn)
        assert m["reward"] == pytest.approx(sum(e["reward"] for e in got) / len(got))
        assert m["groups_kept"] <= B and m["gen_batches"] <= cap
        flat = sum(len({e["reward"] for e in got[i:i + G]}) == 1 for i in range(0, len(got), G))
        assert flat == 0 or m["groups_kept"] == flat == B      # all differ, or none did: the first draw
        assert m["zero_variance_groups"] == pytest.approx(flat / m["groups_kept"])
    # What this run exercised (sampled from the initial weights only, so the same on every CPU).
    assert any(m["gen_batches"] > 1 for m in metrics) and cut
