"""Distributed plumbing shared by rrr.py and rerest.py: one code path for 1 CPU process, N CPU
processes (gloo) and N GPUs (NCCL).

- `init_distributed`: a process group always exists; without torchrun it is a 1-process group, so
  single-process runs exercise the same FSDP code as 8-GPU runs. On CPU it sets the thread count
  per process and `keep_freed_memory`.
- `shard_model`: FSDP2 (`fully_shard`) per decoder layer, then the root. On CUDA the parameters
  stay fp32 (the master weights) and compute runs in bf16 (`MixedPrecisionPolicy`).
- `copy_full_weights`: all-gathers the sharded weights into an ordinary module that each rank
  samples from on its own. Decoding then needs no collective at all, so ranks whose rows end after
  different numbers of steps can never deadlock (RESEARCH.md pitfall 6).
- `save_checkpoint` / `load_checkpoint`: torch.distributed.checkpoint of model + optimizer, plus a
  JSON state (step, history, ...) and every RNG state of every rank; written to a temporary
  folder and renamed, so a crash never leaves a half checkpoint behind.
- `export_hf`: the final model in Hugging Face format (safetensors, config, tokenizer, chat template).

FSDP averages gradients over ranks; losses that are already normalised by a global count (the
"dapo" token count) are multiplied by the world size first, so the result is the global sum.
"""

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Joins torchrun's process group, or makes a 1-process one. `device`: "cpu", "cuda" or None (auto)."""
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=dev if use_cuda else None)
    if not use_cuda:
        # N processes on one CPU share its cores; more threads than cores only adds contention.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        keep_freed_memory()
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    By default every freed block over 32 MB (a chunk of output-head logits, the embedding's gradient)
    goes back to the OS, and the next one faults in fresh zeroed pages: about 10 GB of page faults per
    GRPO step of the benchmark, a quarter of the update's time on the 2-core CPU (BENCHMARKS.md). The
    cost is that the process keeps its high-water mark of memory. Returns whether it took effect."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):            # not glibc: leave the allocator alone
        return False


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model):
    return (model.get_decoder() if hasattr(model, "get_decoder") else model.model).layers


def shard_model(model, d: Dist):
    """FSDP2 over the world: each decoder layer is one unit (gathered for its forward and backward only),
    the root holds the rest (embeddings, final norm, tied head)."""
    # The outputs read here (logits, hidden states) are never modified in place, which is the case
    # this warning is about; it would otherwise print on every forward.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if d.device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def copy_full_weights(sharded, plain):
    """plain <- the full weights of the sharded model. A collective: every rank calls it."""
    target = dict(plain.named_parameters())
    for name, p in sharded.named_parameters():
        target[name].copy_(full_tensor(p.detach()))


def all_sum(values, d: Dist) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, d: Dist) -> list:
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    dist.barrier()


# --- checkpoints -----------------------------------------------------------------------------------

def _rng_states() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, step: int, model, optimizer, state: dict, d: Dist, keep: int = 2):
    """folder/step_NNNNNN holds the DCP shards, state.json and rng_rank{r}.pt; folder/latest names it."""
    folder = Path(folder)
    final = folder / f"step_{step:06d}"
    tmp = folder / f"step_{step:06d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_states(), tmp / f"rng_rank{d.rank}.pt")
    barrier()
    if d.main:
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, world=d.world)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _write_atomic(folder / "latest", final.name)
        for old in sorted(folder.glob("step_*"))[:-keep]:
            if old.name != final.name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(folder: Path, model, optimizer, d: Dist) -> dict | None:
    """Restores the latest checkpoint in `folder` into model and optimizer; returns its state or None."""
    pointer = Path(folder) / "latest"
    if not pointer.exists():
        return None
    path = Path(folder) / pointer.read_text().strip()
    state = json.loads((path / "state.json").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    rng = path / f"rng_rank{d.rank}.pt"
    if state.get("world") == d.world and rng.exists():
        _set_rng_states(torch.load(rng, weights_only=False))
    return state


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_hf(model, tokenizer, folder: Path, d: Dist):
    """Writes the full model (fp32 master weights) in Hugging Face format; a collective."""
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        folder = Path(folder)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(full)
        plain.generation_config = model.generation_config
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    barrier()
