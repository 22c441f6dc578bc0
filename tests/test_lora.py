"""rrr.py --use-peft: LoRA adapters on every linear layer of the decoder, the KL reference as the same model
with its adapters off, the sampler on merged weights, checkpoints of the adapters alone. Each check is
against an independent reference: a plain model whose weights are merged here by hand, the base model's
own outputs, the rank of a weight change, a run of 1 process against 2."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import parallel as par
import rrr
from model import LoRALinear, adapters_off, add_lora
from runs import LORA_LINEAR, parse_config, read_jsonl
from test_attempts import planted_args
from test_rrr import ENV, REPO, final_weights, free_port, kill_and_resume, replay, run_rrr
from tiny import tiny_model

R = 2


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_off_is_the_base_model_and_on_is_the_merged_one():
    """With nonzero adapters, adapters_off gives the base model's logits bit for bit, and the adapted model
    gives a plain model's whose weights are W + (alpha / r) B A, merged here by hand."""
    base, adapted, merged = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=1)
    add_lora(adapted, R, alpha=4.0, seed=0, targets=LORA_LINEAR)
    g = torch.Generator().manual_seed(5)
    for m in adapted.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.data = torch.randn(m.lora_b.shape, generator=g) * 0.1
    with torch.no_grad():
        for name, m in adapted.named_modules():
            if isinstance(m, LoRALinear):
                plain = merged.get_submodule(name)
                plain.weight += (4.0 / R) * torch.einsum("or,ri->oi", m.lora_b, m.lora_a)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with adapters_off(adapted):
        assert torch.equal(logits(adapted, ids), logits(base, ids))
    assert torch.allclose(logits(adapted, ids), logits(merged, ids), atol=1e-4)
    assert not torch.allclose(logits(adapted, ids), logits(base, ids), atol=1e-2)     # the adapters act
    n = sum(isinstance(m, LoRALinear) for m in adapted.modules())
    assert n == 7 * len(adapted.model.layers)


def peft_args(planted, out, **extra):
    return planted_args(planted, out, **({"lora_r": R, "lora_alpha": 4.0} | extra)) + ["--use-peft"]


@pytest.fixture(scope="module")
def peft_run(planted, tmp_path_factory):        
    out = tmp_path_factory.mktemp("peft") / "run"
    done = run_rrr(peft_args(planted, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_config_json_records_every_setting_as_it_ran(peft_run):
    """Every default is applied before config.json is written: no null stands for a value the run chose
    (checked against what the run used: LoRA on all seven layers, exported with the adapters; fp32 on one
    CPU process; the clip range's upper side equal to its lower; no checkpointing below 1B parameters)."""
    recorded = json.loads((peft_run / "config.json").read_text())
    with safe_open(str(peft_run / "adapters.safetensors"), "pt") as f:
        header = f.metadata()
    assert recorded["lora_target_modules"] == json.loads(header["targets"]) == list(LORA_LINEAR)
    assert recorded["gradient_checkpointing"] is False and recorded["device"] == "cpu"
    assert recorded["epsilon_high"] == recorded["epsilon"] == 0.2
    assert recorded["bf16"] is False and recorded["model"] and recorded["reflection_prompt"]


def test_an_update_changes_each_adapted_weight_by_rank_r_and_nothing_else(planted, peft_run):  
    """The exported (merged) model against the model the run started from: every adapted weight moved by a
    matrix of rank at most r, every other tensor (embeddings, norms) is unchanged bit for bit."""
    start = load_file(str(planted[0] / "model.safetensors"))
    end = final_weights(peft_run)
    moved = 0
    for name, w in start.items():
        adapted = name.endswith(".weight") and name.split(".")[-2] in LORA_LINEAR
        if not adapted:
            assert torch.equal(end[name], w), name
            continue
        # Singular values past the r-th are fp32 rounding of the merged sum, orders of magnitude smaller.
        sv = torch.linalg.svdvals((end[name] - w).double())
        assert sv[R] <= 1e-4 * sv[0], (name, sv[:R + 1])
        moved += bool(sv[0] > 1e-6)
    assert moved == 7 * 2          # every adapted weight of both layers learned something
    metrics = read_jsonl(peft_run / "metrics.jsonl")
    assert metrics[0]["mean_kl"] == 0 and metrics[1]["mean_kl"] > 0     # the reference: adapters off


def test_the_adapters_file_rebuilds_the_merged_model(planted, peft_run):   
    """adapters.safetensors on the base model gives the log-probs of final/, the merged export."""
    from transformers import AutoModelForCausalLM
    with safe_open(str(peft_run / "adapters.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        adapters = {k: f.get_tensor(k) for k in f.keys()}
    assert meta == {"r": R, "alpha": 4.0, "targets": list(LORA_LINEAR)}
    assert len(adapters) == 2 * 7 * 2 and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    rebuilt = AutoModelForCausalLM.from_pretrained(planted[0]).eval()
    add_lora(rebuilt, meta["r"], meta["alpha"], seed=0, targets=meta["targets"])
    missing, unexpected = rebuilt.load_state_dict(adapters, strict=False)
    assert not unexpected and all(not k.endswith(("lora_a", "lora_b")) for k in missing)
    merged = AutoModelForCausalLM.from_pretrained(peft_run / "final").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(rebuilt, ids).log_softmax(-1), logits(merged, ids).log_softmax(-1), atol=1e-4)


@pytest.mark.slow
def test_peft_on_two_ranks_equals_one_process(planted, tmp_path):   
    """The episodes two ranks sampled, replayed through the update in one process (test_rrr.replay): the
    same losses and gradient norms, and the same adapters at the end."""
    out = tmp_path / "two"
    args = peft_args(planted, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "rrr.py")] + args
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    cfg = parse_config(rrr.Config, args)
    d = par.init_distributed("cpu")
    try:
        pol = rrr.load_policy(cfg, d)
        assert pol.ref is None          # no second copy: the reference is the model with its adapters off
        replay(cfg, d, pol, out, metrics, rel=1e-4, abs=1e-7)
        assert metrics[-1]["grad_norm"] > 1e-4 and metrics[-1]["mean_kl"] > 0     # real updates compared
        exported = load_file(str(out / "adapters.safetensors"))
        trained = {n: par.full_tensor(p.detach()) for n, p in pol.model.named_parameters() if p.requires_grad}
        assert trained.keys() == exported.keys()
        for name in trained:   # Adam on near-zero gradients: summation order moves a weight by a fraction of lr
            assert (trained[name] - exported[name]).abs().max() <= 0.1 * cfg.learning_rate, name
    finally:
        par.close_distributed()


@pytest.mark.slow
def test_kill_and_resume_with_adapters_is_bitwise(planted, tmp_path):    
    """Checkpoints hold the adapters and their optimizer state; with a cosine schedule and warmup, the
    resumed run ends with the same weights as one that was never stopped."""
    out = kill_and_resume(tmp_path, lambda o: peft_args(planted, o, steps=4, save_every=1, eval_every=0,
                                                        lr_scheduler_type="cosine", warmup_ratio=0.25))
    assert [m["learning_rate"] for m in read_jsonl(out / "metrics.jsonl")][:2] == [0.0, 1e-2]   # the warmup
    step = (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())
    saved = sum(p.stat().st_size for p in step.glob("*.distcp"))
    full = (planted[0] / "model.safetensors").stat().st_size
    assert saved < full / 2, (saved, full)         # adapters and their Adam moments, not the whole model
