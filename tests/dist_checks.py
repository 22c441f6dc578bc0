"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo). Each check writes what rank 0
measured to OUT as JSON:

    dist_checks.py phases MODEL OUT    live bytes per rank in each phase of an RRR step, --bf16
    dist_checks.py gather MODEL OUT    the collectives that fill the sampler: dtype and size of each
    dist_checks.py export MODEL OUT    export while the default group's timeout is 3 s and writing takes 6 s
"""

import datetime
import gc
import json
import sys
import time

import torch
import torch.distributed as dist

mode, model_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "export":    # a short timeout for every ordinary collective, as NCCL's 10 minutes are to a 7B export
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))

import parallel as par  # noqa: E402
import policy  # noqa: E402
import rrr  # noqa: E402
from runs import parse_config  # noqa: E402


def live_bytes() -> int:
    """Bytes of every tensor storage alive in this process (a DTensor counts its local shard once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            t = obj._local_tensor if hasattr(obj, "_local_tensor") else obj
            if t.device.type == "meta":
                continue
            s = t.untyped_storage()
            storages[s._cdata] = s.nbytes()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
    return sum(storages.values())


d = par.init_distributed("cpu")
cfg = parse_config(rrr.Config, [f"--model={model_dir}", "--bf16", "--beta=0.001", "--num-generations=2",
                                "--micro-batch-size=2", "--no-gradient-checkpointing"])
result = {}
if mode == "phases":
    start = live_bytes()
    pol = rrr.load_policy(cfg, d)
    result["params"] = sum(p.numel() for p in pol.sampler.parameters())
    result["load"] = live_bytes() - start
    with rrr.sampling(pol):
        result["sampling"] = live_bytes() - start
    result["after_sampling"] = live_bytes() - start
    # Two micro-batches of one group each; the bytes held after the first backward are read when the
    # second micro-batch computes its loss.
    seen = []
    loss_fn = policy.policy_loss

    def measuring_loss(*args, **kwargs):
        seen.append(live_bytes() - start)
        return loss_fn(*args, **kwargs)

    policy.policy_loss = measuring_loss     # what policy.grpo_update calls
    prompt = [5, 6, 7, 8, 9, 10]
    episodes = [rrr.Episode("x", prompt + [11 + r, 12, 13], (6, 9), float(r % 2), False, 3, advantage=float(r % 2) - 0.5)
                for r in range(4)]
    rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
    result["after_backward"] = seen[1]
    result["after_step"] = live_bytes() - start
elif mode == "gather":
    pol = rrr.load_policy(cfg, d)
    calls = []
    # What FSDP2 gathers with (its name moved between torch versions).
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    gather = getattr(dist, name)

    def recording(output, input, *args, **kwargs):
        calls.append([str(input.dtype), input.numel() * d.world])
        return gather(output, input, *args, **kwargs)

    setattr(dist, name, recording)
    with rrr.sampling(pol):
        setattr(dist, name, gather)
        full = {n: par.full_tensor(q.detach()).to(torch.bfloat16) for n, q in pol.model.named_parameters()}
        mine = dict(pol.sampler.named_parameters(remove_duplicate=False))
        exact = sorted(mine) == sorted(dict(pol.model.named_parameters(remove_duplicate=False))) and all(
            torch.equal(mine[n], full[n] if n in full else full["model.embed_tokens.weight"]) for n in mine)
    result = dict(calls=calls, exact=exact,
                  layer_params=sum(p.numel() for p in par.decoder_layers(pol.sampler)[0].parameters()),
                  root_params=sum(p.numel() for n, p in pol.sampler.named_parameters() if ".layers." not in n))
elif mode == "export":
    pol = rrr.load_policy(cfg, d)
    from transformers import PreTrainedModel
    save = PreTrainedModel.save_pretrained

    def slow_save(self, *args, **kwargs):
        time.sleep(6)
        return save(self, *args, **kwargs)

    PreTrainedModel.save_pretrained = slow_save
    from torch.utils._python_dispatch import TorchDispatchMode

    class RandomInit(TorchDispatchMode):
        """Counts random initialisations of real (not meta) tensors."""
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(k in name for k in ("normal_", "uniform_", "trunc_normal")) and args[0].device.type != "meta":
                RandomInit.count += 1
            return func(*args, **(kwargs or {}))

    with RandomInit():
        par.export_hf(pol.model, pol.tokenizer, rrr.Path(out).with_suffix(".model"), d)
    result = dict(random_inits=RandomInit.count)
if d.main:
    rrr.Path(out).write_text(json.dumps(result))
par.close_distributed()
