"""The multi-GPU path, checked on CPU: bf16 compute with fp32 master weights (2 gloo ranks), memory per
rank in each phase against the formula in BENCHMARKS.md, how the sampler's weights are gathered, export
past the collective timeout, activation checkpointing, every rank busy, a run folder that some rank
cannot see, and the sandbox's share of the cores."""

import json
import os
import subprocess
import sys

import pytest
import torch

import parallel as par
from runs import local_share_of_cores
import sandbox
from parallel import checkpoint_layers
from grpo import head_logprobs, packed_logprobs, policy_loss
from runs import read_jsonl
from test_grpo import free_port, packed_toy_groups
from test_rrr import ENV, common_args, run_rrr
from tiny import REPO, save_coin_flip_chat_model, save_tiny_chat_model, tiny_model

TESTS_ENV = dict(ENV, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), seed=3)


@pytest.fixture(scope="module")
def one_process():
    d = par.init_distributed("cpu")
    yield d
    par.close_distributed()


def torchrun(script, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *map(str, args)]
    return subprocess.run(cmd, env=TESTS_ENV, capture_output=True, text=True, timeout=600)


def dist_check(mode, model, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    done = torchrun(REPO / "tests" / "dist_checks.py", mode, model, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bf16_with_equal_rewards_has_exactly_zero_kl_and_gradient(tmp_path, tiny_chat):
    """With every reward equal, every advantage is 0, so the only term is the KL to the reference, which
    must be exactly 0 at step 1: the reference and the trained model compute the same numbers in bf16.
    A reference made with `.to(bfloat16)` also rounds the rotary table and gave mean_kl 1.1e-3 here."""
    out = tmp_path / "run"
    done = run_rrr(common_args(tiny_chat, out, steps=1) + ["--bf16"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["bf16"] is True
    step = read_jsonl(out / "metrics.jsonl")[0]
    assert step["reward"] == 0 and step["zero_variance_groups"] == 1
    assert step["mean_kl"] == 0.0 and step["grad_norm"] == 0.0


def test_cast_parameters_keeps_the_rotary_table_in_fp32(tiny_chat):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.bfloat16)
    cast = par.cast_parameters(AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32), torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    ids = torch.arange(3, 700)[None] % 1000
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, loaded(ids).logits)           # what from_pretrained(bf16) computes
        assert not torch.equal(fp32.to(torch.bfloat16)(ids).logits, loaded(ids).logits)


def test_loss_logprobs_are_an_fp32_log_softmax_of_the_bf16_head_under_bf16_fsdp(one_process):
    """Under FSDP with bf16 compute the head's weight is gathered in bf16 and its product runs in bf16 (as
    the sampler's: AMX's bf16 kernels, BENCHMARKS.md); the log-softmax of the loss' log-probs must still run
    in fp32, on those logits: what HF's own bf16 head gives, widened before the log-softmax."""
    model = tiny_model(seed=8, vocab_size=4096)
    plain = par.cast_parameters(tiny_model(seed=8, vocab_size=4096), torch.bfloat16)
    par.shard_model(model, one_process, bf16=True)
    ids = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)                                  # leaves the root unit (embeddings, head) gathered
        hidden = plain(ids, output_hidden_states=True).hidden_states[-1][0, :-1]     # (39, H), bf16
        got = head_logprobs(model, hidden, ids[0, 1:])
        assert model.lm_head.weight.dtype == torch.bfloat16
        want = plain.lm_head(hidden).float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        in_bf16 = plain.lm_head(hidden).log_softmax(-1).float().gather(-1, ids[0, 1:, None])[:, 0]
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    assert (in_bf16 - want).abs().max() > 1e-3      # a bf16 log-softmax would be told apart


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_mask_truncated_completions_with_one_token_reflections(tmp_path, nproc):
    """A model that ends its turn at once half of the time, reflections of one token: some micro-batches
    have no trained token at all (every reflection was cut) and others have some. Every rank must still
    run the same forward and backward calls (a backward on nothing raised; ranks would hang)."""
    model = save_coin_flip_chat_model(tmp_path / "coin")
    out = tmp_path / "run"
    done = run_rrr(common_args(model, out, steps=6, batch_size=4, train_size=8, micro_batch_size=2,
                               max_reflection_length=1, max_completion_length=4) + ["--mask-truncated-completions"],
                   nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    episodes = read_jsonl(out / "episodes.jsonl")
    assert len(episodes) == 6 * 4 * 2
    # Micro-batches of 2 rows (one group); a rank's rows are consecutive in the log.
    cut = [[e["truncated"] for e in episodes[i:i + 2]] for i in range(0, len(episodes), 2)]
    assert any(all(c) for c in cut) and any(not all(c) for c in cut)
    assert all(m["grad_norm"] == m["grad_norm"] for m in read_jsonl(out / "metrics.jsonl"))   # no NaN


@pytest.mark.slow
def test_bytes_per_rank_in_each_phase_match_the_formula(tmp_path, tiny_chat):
    """Live tensor bytes on rank 0 of 2, --bf16, against BENCHMARKS.md's bytes per parameter per rank
    (N ranks, P parameters, R of them in the root unit):
    between phases 4/N master + 2/N reference (+ 8/N Adam once stepped); sampling + 2 (the full bf16
    sampler, no fused copies); during the update + 4/N gradients (reduce-scattered every micro-batch,
    never a full fp32 gradient) + 2R (the gathered root, whose head the loss multiplies by in bf16)."""
    m = dist_check("phases", tiny_chat, tmp_path)
    P, N = m["params"], 2
    R = 49152 * 64                           # tied embeddings and head: the root unit is the embedding
    assert m["load"] == pytest.approx((4 + 2) / N * P, rel=0.01)
    assert m["sampling"] - m["load"] == pytest.approx(2 * P, rel=0.01)
    assert m["after_sampling"] == m["load"]
    assert m["after_backward"] == pytest.approx((4 + 2 + 4) / N * P + 2 * R, rel=0.02)
    assert m["after_step"] == pytest.approx((4 + 2 + 8) / N * P, rel=0.01)


@pytest.mark.slow
def test_sampler_weights_gathered_in_bf16_one_unit_at_a_time(tmp_path, tiny_chat):
    m = dist_check("gather", tiny_chat, tmp_path)
    assert m["exact"]                        # the sampler holds exactly the bf16 cast of the master weights
    assert m["calls"] and all(dtype == "torch.bfloat16" for dtype, _ in m["calls"])
    assert max(n for _, n in m["calls"]) <= max(m["layer_params"], m["root_params"]) + 2
    assert len(m["calls"]) == 3              # two decoder layers, then the root


@pytest.mark.slow
def test_export_outlasts_the_collective_timeout_and_initialises_nothing(tmp_path, tiny_chat):
    """Rank 0 writes for 6 s while the default group's timeout is 3 s: the other rank waits in the slow
    barrier instead. The exported model is built on the meta device: no random initialisation."""
    m = dist_check("export", tiny_chat, tmp_path)
    assert m["random_inits"] == 0
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export.model")
    original = AutoModelForCausalLM.from_pretrained(tiny_chat)
    for (name, a), b in zip(exported.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    assert exported.lm_head.weight is exported.model.embed_tokens.weight


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, one_process):
    """TRL's save_total_limit: N keeps the newest N complete checkpoints; None (the default) keeps all."""
    model = par.shard_model(tiny_model(vocab_size=32, seed=0), one_process)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept = {}
    for limit in (None, 2):
        folder = tmp_path / str(limit)
        for step in (1, 2, 3):
            par.save_checkpoint(folder, step, model, optimizer, {}, one_process, save_total_limit=limit)
        kept[limit] = sorted(p.name for p in folder.glob("step_*"))
        assert (folder / "latest").read_text() == "step_000003"
    assert kept == {None: ["step_000001", "step_000002", "step_000003"], 2: ["step_000002", "step_000003"]}


def test_export_files_get_the_umask_modes(tmp_path, tiny_chat, one_process):
    """safetensors writes model.safetensors 0600; the export gives every file what the umask gives new files."""
    from model import load_model
    model, tok = load_model(str(tiny_chat), device="cpu", dtype=torch.float32)
    old = os.umask(0o027)
    try:
        par.export_hf(model, tok, tmp_path / "m", one_process)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize("fsdp", [False, True])
def test_gradient_checkpointing_same_gradients_fewer_saved_activations(one_process, fsdp):
    """packed_logprobs runs a prefix pass that fills a KV cache and a continuation pass that reads it:
    with checkpointed layers the gradients are the same, the cache is not appended to twice in the
    recompute, and far fewer bytes are kept for backward."""
    groups, adv = packed_toy_groups()
    results = {}
    for checkpointing in (False, True):
        model = tiny_model(seed=8, hidden=128, layers=3).train()
        if fsdp:
            par.shard_model(model, one_process, checkpointing=checkpointing)
        elif checkpointing:
            checkpoint_layers(model)
        state = {}

        def forward():
            lp = packed_logprobs(model, groups)
            width = max(len(x) for x in lp)
            values = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in lp])
            mask = torch.stack([torch.nn.functional.pad(torch.ones(len(x)), (0, width - len(x))) for x in lp])
            state["loss"] = policy_loss(values, values.detach(), adv, mask)[0]

        kept = saved_bytes(forward)
        state["loss"].backward()
        results[checkpointing] = kept, torch.cat([par.full_tensor(p.grad).flatten() for p in model.parameters()])
    assert torch.allclose(results[True][1], results[False][1], atol=1e-6)
    assert results[True][0] < 0.5 * results[False][0]


def test_chunks_keep_every_rank_busy():
    """A chunk is per_rank x world items: on 16 ranks each has work, where fixed chunks of 8 left 8 idle."""
    items = list(range(40))
    for world in (1, 2, 8, 16):
        shares = [list(par.rank_chunks(items, 2, par.Dist(r, world, torch.device("cpu")))) for r in range(world)]
        for k, chunk in enumerate(shares[0]):
            assert chunk[0] == items[k * 2 * world:(k + 1) * 2 * world]
            parts = [s[k][1] for s in shares]
            assert sorted(x for p in parts for x in p) == chunk[0]
            if len(chunk[0]) == 2 * world:
                assert all(len(p) == 2 for p in parts)


def test_a_chunk_cut_short_by_a_crash_is_redone_whole_and_the_file_ends_as_an_uninterrupted_run(tmp_path, one_process):
    """par.resumable_chunks, the stage behind rrr's failure set and every Re-ReST cache: two rows per item,
    chunks of three items. A crash that cut chunk 1's write after 5 of its 6 rows (and half a line) must not
    leave its last item with one row: chunk 1 is redone whole, chunk 0 is not, and the file ends byte for
    byte as an uninterrupted run's."""
    items, calls = [(f"p{i}", i) for i in range(7)], []

    def work(number, keys, payloads):       # rows that depend on the chunk, as seeded sampling does
        calls.append(number)
        return [dict(key=k, j=j, value=100 * number + 10 * p + j) for k, p in zip(keys, payloads) for j in range(2)]

    def stage(path):
        return par.resumable_chunks(path, items, work, one_process, per_rank=3, desc="test", header=dict(meta=1),
                                    rows_per_item=2)

    whole = stage(tmp_path / "whole.jsonl")
    assert calls == [0, 1, 2] and [r["value"] for r in whole["p4"]] == [140, 141]
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(lines[0]) == dict(meta=1) and len(lines) == 1 + 14
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:1 + 6 + 5]) + lines[12][:7])
    calls.clear()
    assert stage(cut) == whole and calls == [1, 2]
    assert cut.read_text() == "".join(lines)
    calls.clear()
    assert stage(cut) == whole and calls == []          # nothing left to do: nothing redone or rewritten


OTHER_VIEW = """
import os, runpy, sys
if os.environ["LOCAL_RANK"] == "1":     # another node: the same path names another folder
    os.makedirs(sys.argv[1], exist_ok=True)
    os.chdir(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_run_folder_that_a_rank_cannot_see_fails_with_one_line(tmp_path, tiny_chat):
    script = tmp_path / "other_view.py"
    script.write_text(OTHER_VIEW)
    work = tmp_path / "node0"
    work.mkdir()
    args = common_args(tiny_chat, "run")          # a relative --out: each "node" sees its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(tmp_path / "node1"), str(REPO / "rrr.py"), *args]
    done = subprocess.run(cmd, env=ENV, cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ranks [1] cannot see run" in errors[0] and "shares" in errors[0], done.stderr[-2000:]
    # torchrun itself reports the failed workers with a traceback of its own; ours print none.
    assert 'rrr.py", line' not in done.stderr and 'parallel.py", line' not in done.stderr


def test_sandbox_workers_share_the_cores_among_local_ranks(monkeypatch):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert local_share_of_cores() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert local_share_of_cores() == 1
    seen = []

    class Pool(sandbox.ThreadPoolExecutor):
        def __init__(self, workers):
            seen.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(sandbox, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    runs = sandbox.run_batch([("def f():\n    return 1\n", ["assert f() == 1"], "")] * 4, None, 5, "check")
    assert seen == [2] and all(r["done"] for _, r in runs)
