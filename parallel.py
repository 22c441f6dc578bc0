"""Distributed plumbing shared by rrr.py, rerest.py and finetune.py: one code path for 1 CPU process, N CPU
processes (gloo) and N GPUs (NCCL). A process group always exists (without torchrun, a 1-process one), so
single-process runs exercise the same FSDP2 code as 8-GPU runs.

FSDP averages gradients over ranks; losses that are already normalised by a global count (the "dapo" token
count) are multiplied by the world size first, so the result is the global sum.
"""

import ctypes
import datetime
import gc
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache
from transformers.utils import logging as hf_logging

from model import decoder_layers, make_readable, merge_lora
from runs import (BadInput, append_jsonl, local_share_of_cores, progress_bar, read_jsonl, write_atomic,
                  write_jsonl)


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


# Waiting while rank 0 alone writes a large export can take longer than NCCL's 10-minute timeout: those
# waits (`barrier(slow=True)`) go through a CPU (gloo) group of their own with a long timeout.
_SLOW_GROUP = None


def init_distributed(device: str | None = None) -> Dist:
    """Joins torchrun's process group, or makes a 1-process one. `device`: "cpu", "cuda" or None (auto)."""
    global _SLOW_GROUP
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        device_id = dev if use_cuda else None
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device_id)
    _SLOW_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
    if not use_cuda:
        # N processes on one CPU share its cores; more threads than cores only adds contention.
        torch.set_num_threads(local_share_of_cores())
        keep_freed_memory()
    if dist.get_rank() != 0:
        # Every rank runs the same code and would print the same warnings into rank 0's progress bars:
        # rank 0 prints each one once.
        hf_logging.set_verbosity_error()
        warnings.simplefilter("ignore")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse; returns whether it took effect. By default every freed block
    over 32 MB (a chunk of head logits, the embedding's gradient) goes back to the OS and the next one faults
    in fresh zeroed pages: about 10 GB of page faults per GRPO step of the benchmark, a quarter of the
    update's time on the 2-core CPU (BENCHMARKS.md). The cost: the process keeps its high-water mark."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):            # not glibc: leave the allocator alone
        return False


def close_distributed():
    # Drop the last reference to the slow group first, so that every process group is torn down here,
    # while the interpreter is whole, and none at interpreter exit, where gloo's threads can abort it.
    global _SLOW_GROUP
    _SLOW_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


# --- sharding and activation checkpointing -----------------------------------------------------------

def checkpointing_by_default(parameters: int) -> bool:
    """Activation checkpointing pays for itself above about 1B parameters, where activations (about
    6 MB per token for a 7B model) rather than weights fill a GPU during the update."""
    return parameters > 1e9


def checkpoint_layers(model):
    """Each decoder layer keeps only its input for backward and recomputes the rest. Hugging Face's own
    gradient checkpointing drops the KV cache, which grpo.packed_logprobs needs (its prefix pass fills a
    cache that the continuation pass reads). Here the layer runs with the cache, and before the recompute
    in backward the cache's layers get back the attributes they had before its forward: the recompute sees
    what the forward saw, whatever was appended since (the keys and values stay alive until backward, as
    in any cache)."""
    for layer in decoder_layers(model):
        def checkpointed(*args, _forward=layer.forward, _layer=layer, **kwargs):
            if not (torch.is_grad_enabled() and _layer.training):
                return _forward(*args, **kwargs)
            cache_layers = [c for v in kwargs.values() if isinstance(v, Cache) for c in v.layers]
            before, ran = [dict(vars(c)) for c in cache_layers], []

            def run(*a):
                if ran:                          # the recompute in backward
                    for c, saved in zip(cache_layers, before):
                        c.__dict__.update(saved)
                ran.append(True)
                return _forward(*a, **kwargs)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        layer.forward = checkpointed


def shard_model(model, d: Dist, bf16: bool = False, checkpointing: bool = False):
    """FSDP2 over the world: each decoder layer is one unit (gathered for its forward and backward only),
    the root holds the rest (embeddings, final norm, head). The model may sit on the CPU: each unit is
    moved to the device as it is sharded, so no rank ever holds the whole model there. bf16: parameters
    stay fp32 (the master weights the optimizer updates); each unit is gathered in bf16 for compute and
    its gradients are reduced in fp32 (TRL's `--bf16`). checkpointing: as resolved by the caller
    (policy.resolve_gradient_checkpointing decides by size before a run records its settings)."""
    # The outputs read here (logits, hidden states) are never modified in place, which is the case
    # this warning is about; it would otherwise print on every forward.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if checkpointing:
        checkpoint_layers(model)        # before fully_shard: FSDP's gathers stay outside the recompute
    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def gathered_across_micro_batches(model, d: Dist):
    """With one CPU process, each decoder layer is gathered once for the block (an update's micro-batches)
    instead of four times per micro-batch (the prefix and continuation passes, forward and backward):
    the shard is then the whole model, so keeping the gathered copy costs one compute-dtype copy of it
    in host memory and saves the gathers' copies and casts (about 1.2 s of a 20 s bf16 update on B;
    BENCHMARKS.md). The layers are resharded on exit, before the optimizer changes the shards. Elsewhere
    a no-op (and for model None): with several processes the gathered copies are the memory that sharding
    saves, and on one GPU a whole bf16 copy (14 GB for a 7B model) could be what no longer fits."""
    if model is None or d.world > 1 or d.device.type != "cpu":
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
        layer.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.set_reshard_after_backward(True, recurse=False)
            layer.reshard()


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def cast_parameters(module, dtype):
    """Casts parameters only. `module.to(dtype)` would also cast buffers such as the rotary
    `inv_freq`, which models keep in fp32: in bf16 its angles are off by 0.14 rad at position 100
    and 1.4 rad at position 1000, so the copy would no longer compute what the model computes."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def empty_copy(model, dtype, device):
    """A model of the same architecture with uninitialised parameters in `dtype` on `device` and the
    model's own buffers (in their own dtypes), built without ever holding a second set of weights."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    cast_parameters(copy, dtype)
    copy.to_empty(device=device)
    if _head_is_embedding(model):        # to_empty gives every module its own tensor: tie them again
        copy.get_output_embeddings().weight = copy.get_input_embeddings().weight
    buffers = dict(model.named_buffers())
    for name, b in copy.named_buffers():
        b.copy_(buffers[name])
    return copy.eval().requires_grad_(False)


def _head_is_embedding(model) -> bool:
    """Whether the head is the input embedding (what the model does, which a checkpoint can make differ
    from what its config says)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embedding.weight


@torch.no_grad()
def copy_full_weights(sharded, plain):
    """plain <- the full weights of the sharded model, one FSDP unit at a time (a decoder layer, then the
    root), gathered in the compute dtype: with bf16, half the traffic and a transient of one layer. A
    collective. Each rank then samples from `plain` on its own, so decoding needs no collective and ranks
    whose rows end after different numbers of steps cannot deadlock. Sampling from the sharded model does:
    a rank whose rows have all ended stops decoding while its peers wait in a weight gather it never joins
    (DeepSpeed issue #8262 reports the same hang)."""
    need = {}        # storage freed by free_weights -> bytes its views need (tied or fused weights share one)
    for p in plain.parameters():
        s = p.untyped_storage()
        end = (p.storage_offset() + p.numel()) * p.element_size()
        need[s._cdata] = (s, max(end, need.get(s._cdata, (s, 0))[1]))
    for s, nbytes in need.values():
        if s.nbytes() < nbytes:
            s.resize_(nbytes)
    target = dict(plain.named_parameters())
    names = {id(m): n for n, m in sharded.named_modules()}
    for unit in [*decoder_layers(sharded), sharded]:
        unit.unshard()
        prefix = names[id(unit)] + "." if names[id(unit)] else ""
        # The root's walk also meets the layers' shards: skipped. LoRA layers give their merged weights.
        gathered = {name: p for name, p in unit.named_parameters() if not hasattr(p, "full_tensor")}
        for name, p in merge_lora(gathered, unit).items():
            target[prefix + name].copy_(p)
        unit.reshard()


def free_weights(plain):
    """Frees the parameters' memory but keeps their shapes, until `copy_full_weights` fills them again."""
    for p in plain.parameters():
        p.untyped_storage().resize_(0)


@contextmanager
def off_device(*modules):
    """Moves the modules' weights to host memory for the duration of the block (on a GPU, a model
    being trained should not share it with idle copies of others); a no-op on the CPU."""
    moved = list({id(m): m for m in modules if next(m.parameters()).device.type != "cpu"}.values())
    devices = [next(m.parameters()).device for m in moved]
    for m in moved:
        m.to("cpu")
    try:
        yield
    finally:
        gc.collect()         # what the block trained holds reference cycles (FSDP's hooks): free it first
        for m, device in zip(moved, devices):
            m.to(device)


# --- collectives, and who does what -------------------------------------------------------------------

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


def barrier(slow: bool = False):
    """slow: for waits on one rank's long file writing (an export), with a timeout of hours."""
    dist.barrier(group=_SLOW_GROUP if slow else None)


def on_rank0(d: Dist, work, *args):
    """work(*args) on rank 0 only (it reads and writes the run folder); its result, or its BadInput, on
    every rank. Every rank checking the folder itself would race with rank 0 creating it."""
    outcome = None
    if d.main:
        try:
            outcome = ("ok", work(*args))
        except BadInput as e:
            outcome = ("bad", str(e))
    outcome = broadcast_object(outcome, d)
    if outcome[0] == "bad":
        raise BadInput(outcome[1])
    return outcome[1]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation of range(n) seeded by the run's seed and the epoch alone,
    the same on every rank, so that the position in the data is a function of the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def sampling_generator(seed: int, d: Dist, purpose: int, step: int) -> torch.Generator:
    """A sampling generator with a distinct, reproducible seed per (run seed, purpose, step, rank):
    resuming needs no saved sampler state."""
    return torch.Generator(d.device).manual_seed(
        ((seed * 1_000_003 + purpose) * 1_000_003 + step) * 1_009 + d.rank)


def rank_chunks(items: list, per_rank: int, d: Dist):
    """Splits `items` into chunks of per_rank x world (every rank gets per_rank of each, the last chunk
    aside) and yields (chunk, this rank's share of it). Sizing chunks by the world keeps every rank
    busy however many there are."""
    size = per_rank * d.world
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        yield chunk, chunk[d.rank::d.world]


def resumable_chunks(path: Path, items: list[tuple[str, object]], work, d: Dist, *, per_rank: int,
                     desc: str, header: dict | None = None, key: str = "key",
                     rows_per_item: int = 1) -> dict[str, list[dict]]:
    """A stage whose rows are kept in the JSON-lines file `path` (rrr's failure set, every Re-ReST cache),
    so that a crash loses at most one chunk of `rank_chunks(items, per_rank, d)`. items: (key, payload)
    pairs. work(number, keys, payloads) does this rank's share of chunk `number` and returns its rows,
    rows_per_item per item, each holding its item's key in row[key]. Returns {key: rows} for every item.

    A chunk with a row missing (a crash can cut its write short) is redone whole: its rows were made in one
    batch with one seed, which redoing only the missing ones would not repeat. The file first starts again
    from `header` (its first line, when given) and the whole chunks' rows, written aside and renamed, so
    that a crash leaves the old file or the new one and the file ends as an uninterrupted run's."""
    rows = broadcast_object(read_jsonl(path) if d.main else None, d)
    found = {}
    for r in rows[1:] if header else rows:
        found.setdefault(r[key], []).append(r)
    chunks = list(rank_chunks(items, per_rank, d))
    whole = [all(len(found.get(k, ())) >= rows_per_item for k, _ in chunk) for chunk, _ in chunks]
    done = {k: found[k] for (chunk, _), w in zip(chunks, whole) if w for k, _ in chunk}
    todo = [n for n, w in enumerate(whole) if not w]
    if todo and d.main:
        kept = ([header] if header else []) + [r for k, _ in items if k in done for r in done[k]]
        write_jsonl(path, kept)
    with progress_bar(iterable=todo, desc=desc, disable=not d.main or not todo) as numbers:
        for n in numbers:
            chunk, mine = chunks[n]
            new = work(n, [k for k, _ in mine], [p for _, p in mine]) if mine else []
            for rank_rows in all_gather_objects(new, d):
                for r in rank_rows:
                    done.setdefault(r[key], []).append(r)
            if d.main:
                append_jsonl(path, [r for k, _ in chunk for r in done[k]])
    return done


def cut_step_logs(d: Dist, out: Path, start: int, logs: tuple[str, ...], answers: dict[str, str],
                  keep: tuple[str, ...]) -> list[list]:
    """A resumed run's per-step logs (files in `out` whose rows have a "step"), cut at checkpoint `start` by
    rank 0, which reads them for everyone (on several nodes only the shared folder is certain): what a
    crash left after the checkpoint is dropped from each, to be recomputed identically; so are the rows
    of an answers file (a key of `answers`) whose step has no line in its summary file (the value, written
    after them). Returns the rows of the files named in `keep`, on every rank."""
    kept = None
    if d.main:
        rows = {name: [r for r in read_jsonl(out / name) if r["step"] <= start] for name in logs}
        for name, summary in answers.items():
            done = {r["step"] for r in rows[summary]}
            rows[name] = [r for r in rows[name] if r["step"] in done]
        for name in logs:
            if (out / name).exists():
                write_jsonl(out / name, rows[name])
        kept = [rows[name] for name in keep]
    return broadcast_object(kept, d)


def check_shared_folder(folder: Path, d: Dist):
    """Every rank must see the files rank 0 writes in `folder` (checkpoints, logs, the failure set):
    rank 0 writes a file with a fresh token and each rank reads it back. Raises BadInput on every rank,
    naming the ranks that cannot see it, rather than letting them hang or diverge later."""
    token, problem = os.urandom(8).hex(), None
    if d.main:
        try:
            (Path(folder) / f".rank0-{token}").write_text(token)
        except OSError as e:
            problem = f"rank 0 cannot write to {folder}: {e}"
    token, problem = broadcast_object((token, problem), d)
    if problem:
        raise BadInput(problem)
    probe = Path(folder) / f".rank0-{token}"
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = [r for r, ok in enumerate(all_gather_objects(seen, d)) if not ok]
    barrier()
    if d.main:
        probe.unlink()
    if blind:
        raise BadInput(f"ranks {blind} cannot see {folder} as rank 0 wrote it: with several nodes, "
                       "--out must be on a filesystem that every node shares")


# --- checkpoints and export ---------------------------------------------------------------------------

def frozen_names(model) -> set[str]:
    """The frozen parameters' names, a tied one under each of its names: ignore_frozen_params still lists a
    head tied to a frozen embedding under the head's name, which state dicts must leave out as well."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state(model, optimizer):
    """The model's and optimizer's state dicts, the frozen parameters left out: with LoRA adapters, a
    checkpoint holds the adapters and their optimizer state only (the base weights are the run's --model)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    frozen = frozen_names(model)
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def save_checkpoint(folder: Path, step: int, model, optimizer, state: dict, d: Dist,
                    save_total_limit: int | None = None):
    """folder/step_NNNNNN holds the torch.distributed.checkpoint shards of model + optimizer, state.json
    (`state` plus step and world) and every rank's RNG states, rng_rank{r}.pt; folder/latest names it.
    Written to step_NNNNNN.tmp and renamed, so a crash never leaves a half checkpoint behind.
    save_total_limit: once the new checkpoint is complete, delete all but the newest N (None:
    keep every one)."""
    folder = Path(folder)
    final = folder / f"step_{step:06d}"
    tmp = folder / f"step_{step:06d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = trainable_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
    barrier()
    if d.main:
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, world=d.world)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_atomic(folder / "latest", final.name)
        if save_total_limit is not None:
            complete = sorted(p for p in folder.glob("step_*") if not p.name.endswith(".tmp"))
            for old in complete[:-max(save_total_limit, 1)]:
                if old.name != final.name:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(folder: Path, model, optimizer, d: Dist) -> dict | None:
    """Restores the latest checkpoint in `folder` into model and optimizer; returns its state or None.
    The RNG states come back only on the world they were saved with."""
    folder = Path(folder)
    # Rank 0 decides, so that every rank enters dcp.load (a collective) or none does.
    found = None
    if d.main and (folder / "latest").exists():
        path = folder / (folder / "latest").read_text().strip()
        found = path, json.loads((path / "state.json").read_text())
    found = broadcast_object(found, d)
    if found is None:
        return None
    path, state = found
    model_sd, optim_sd = trainable_state(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if state["world"] == d.world:
        rng = torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def merged_state(model) -> dict:
    """The full weights on rank 0 (gathered one parameter at a time to its CPU; empty on the other ranks),
    with every LoRA adapter merged, in plain Hugging Face names. A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return merge_lora(get_model_state_dict(model, options=options), model)


def export_adapters(model, path: Path, metadata: dict, d: Dist):
    """The LoRA adapters alone (lora_a, lora_b of every adapted layer, full tensors, fp32) in one safetensors
    file, `metadata` (r, alpha, targets) in its header; written by rank 0. A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    frozen = frozen_names(model)
    state = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in frozen}
    if d.main:
        tmp = Path(str(path) + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        tmp.rename(path)
    barrier()


def export_hf(model, tokenizer, folder: Path, d: Dist):
    """Writes the model in Hugging Face format (safetensors of the fp32 master weights with any LoRA adapter
    merged, config, tokenizer and chat template); a collective. Rank 0 builds the model on the meta device
    and puts the gathered tensors in place: no random initialisation, no second copy. The others wait in
    the slow barrier while it writes. Written to a temporary folder and renamed; the files get the modes
    the umask gives (safetensors writes 0600)."""
    state = merged_state(model)
    if d.main:
        folder = Path(folder)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        tied = ({k for k, _ in plain.named_parameters(remove_duplicate=False)}
                - {k for k, _ in plain.named_parameters()})
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
        if _head_is_embedding(model):      # assign=True gave the head and the embedding a tensor each
            plain.get_output_embeddings().weight = plain.get_input_embeddings().weight
        plain.generation_config = model.generation_config
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_readable(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    barrier(slow=True)
