"""Fine-tuning on token ids, as Re-ReST's steps 3 and 4 train (train_model): supervised (SFT) on
(prompt, target) pairs or DPO on (prompt, chosen, rejected) triples against the frozen initial model; full
fine-tuning or LoRA (model.add_lora); FSDP-sharded over the ranks, resumable from a checkpoint per epoch, and
exported in Hugging Face format with LoRA merged (parallel.export_hf). Only the target tokens enter a loss.

`cfg` is any object with rerest.Config's training fields: lora_r, lora_alpha, seed, bf16,
gradient_checkpointing, learning_rate, lr_scheduler_type, warmup_ratio, batch_size, micro_batch_size, epochs,
dpo_beta, save_total_limit.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

import parallel as par
from grpo import head_logprobs
from model import adapters_off, add_lora, chat_ids, load_model, pad_ids
from runs import apply_lr_schedule, progress_bar, show_progress

MAX_GRAD_NORM = 1.0


def span_mask(spans: list[tuple[int, int]], length: int, device=None) -> torch.Tensor:
    """(B, length) float mask with 1 on positions start <= t < end of each row's (start, end) span."""
    t = torch.arange(length, device=device)
    bounds = torch.tensor(spans, dtype=torch.long, device=device).view(-1, 2)
    return ((t[None] >= bounds[:, :1]) & (t[None] < bounds[:, 1:])).float()


def pad_batch(seqs: list[list[int]], spans: list[tuple[int, int]], device=None):
    """`pad_ids` on `device`, with the span mask of `span_mask`: pad slots are never trained."""
    ids, attn = pad_ids(seqs)
    return ids.to(device), attn.to(device), span_mask(spans, ids.shape[1], device=device)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """(B, T) log-probs of input_ids where mask is 1, zeros elsewhere. `logprobs[b, t]` is
    log p(input_ids[b, t] | input_ids[b, :t]), so position 0 is never trained. The model's own forward
    (FSDP gathers and frees as usual) keeps the final-norm hidden states, and the head runs only on
    those whose next token is trained (grpo.head_logprobs)."""
    if mask[:, 0].any():
        raise ValueError("position 0 has no prefix and cannot be trained")
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1]                               # (B, T, H), after the final norm
    where = mask[:, 1:].bool()                                   # next token trained
    values = head_logprobs(model, hidden[:, :-1][where], input_ids[:, 1:][where], chunk_size)
    result = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return result.masked_scatter(torch.nn.functional.pad(where, (1, 0)), values)


def sft_loss(logprobs, mask, total_tokens):
    """Mean negative log-likelihood of the solution tokens (mask 1) over the whole step's solution tokens."""
    return -(logprobs * mask).sum() / total_tokens


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """Per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from sequence log-prob sums (P,)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def sft_data(tok, rows, prompt_of) -> list[tuple[list[int], list[int]]]:
    """Training pairs for train_model: (prompt ids, solution ids ending with EOS) for each row (rerest.py's
    sampled solutions and corrections: "tokens" as sampled); prompt_of(row) gives the prompt's messages."""
    data = []
    for r in rows:
        target = list(r["tokens"])
        if target and target[-1] == tok.eos_token_id:
            target = target[:-1]
        data.append((chat_ids(tok, prompt_of(r)), target + [tok.eos_token_id]))
    return data


def shown_parts(rows: list, size: int):
    """rows in micro-batches of `size`, each named on the progress bar as it starts."""
    parts = [rows[start:start + size] for start in range(0, len(rows), size)]
    for number, part in enumerate(parts, 1):
        show_progress(f"micro-batch {number}/{len(parts)}")
        yield part


def train_model(cfg, d, init: str | None, data: list, folder: Path, kind: str = "sft") -> Path:
    """Fine-tunes `init` and exports it to `folder` (Hugging Face format, LoRA merged). data: for "sft",
    (prompt_ids, target_ids) pairs; for "dpo", (prompt_ids, chosen_ids, rejected_ids) triples."""
    if (folder / "config.json").exists():
        return folder
    # Loaded on the CPU: sharding moves one layer at a time to the device.
    model, tok = load_model(init, device="cpu", dtype=torch.float32)
    if cfg.lora_r:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    model.train()
    par.shard_model(model, d, bf16=cfg.bf16, checkpointing=cfg.gradient_checkpointing)
    ref = None
    if kind == "dpo" and cfg.lora_r:     # the reference: the same model with its adapters off (no copy)
        ref = model
    elif kind == "dpo":    # the base model, frozen, sharded like the trained one, in the compute dtype
        ref, _ = load_model(init, device="cpu", dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        par.shard_model(ref.requires_grad_(False), d, bf16=cfg.bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    per_rank = cfg.batch_size // d.world
    steps_per_epoch = max(1, -(-len(data) // cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    state = par.load_checkpoint(folder / "checkpoints", model, optimizer, d) or dict(step=0)
    with progress_bar(iterable=range(state["step"], total), total=total, initial=state["step"],
                      desc=f"train {folder.name}", disable=not d.main) as steps:
        for step in steps:
            epoch, i = divmod(step, steps_per_epoch)
            order = par.epoch_order(len(data), cfg.seed, epoch)
            # Every rank takes the same number of rows (wrapping around), so FSDP's collectives line up.
            picked = [data[order[(i * cfg.batch_size + j) % len(data)]] for j in range(cfg.batch_size)]
            mine = picked[d.rank * per_rank:(d.rank + 1) * per_rank]
            if kind == "sft":
                total_tokens = sum(len(t) for _, t in picked)
                for part in shown_parts(mine, cfg.micro_batch_size):
                    spans = [(len(p), len(p) + len(t)) for p, t in part]
                    ids, attn, mask = pad_batch([p + t for p, t in part], spans, d.device)
                    loss = sft_loss(token_logprobs(model, ids, attn, mask), mask, total_tokens)
                    (loss * d.world).backward()        # FSDP averages over ranks
            else:
                for part in shown_parts(mine, cfg.micro_batch_size):
                    seqs = [p + c for p, c, _ in part] + [p + r for p, _, r in part]
                    spans = ([(len(p), len(p) + len(c)) for p, c, _ in part]
                             + [(len(p), len(p) + len(r)) for p, _, r in part])
                    ids, attn, mask = pad_batch(seqs, spans, d.device)
                    # The reference first: with LoRA it is the trained model itself (adapters off), whose
                    # gathered root is freed here, before the forward that the backward below needs.
                    with torch.no_grad(), adapters_off(ref):
                        ref_sums = token_logprobs(ref, ids, attn, mask).sum(1)
                    ref.reshard()      # its root stays gathered after a forward that has no backward
                    sums = token_logprobs(model, ids, attn, mask).sum(1)
                    n = len(part)
                    loss = dpo_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], cfg.dpo_beta)
                    loss = loss.sum() / cfg.batch_size
                    (loss * d.world).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
            apply_lr_schedule(optimizer, cfg, step, total)     # step: the global index, after a resume too
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % steps_per_epoch == 0 and step + 1 < total:
                par.save_checkpoint(folder / "checkpoints", step + 1, model, optimizer, {}, d,
                                    save_total_limit=cfg.save_total_limit)
    par.export_hf(model, tok, folder, d)         # LoRA merged
    return folder
