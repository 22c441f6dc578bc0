"""Run by tests/test_grpo.py under torchrun. Each rank takes its share of a toy batch, divides its loss
by the GLOBAL trained-token count, and the gradients are combined over ranks (gloo):

    grpo_two_ranks.py plain OUT   an ordinary model, gradients summed with all_reduce
    grpo_two_ranks.py fsdp OUT    the training path of rrr.py: FSDP2 shards, packed_logprobs (two
                                  forwards per backward), loss * world because FSDP averages
    grpo_two_ranks.py fsdp-checkpointing OUT    the same with activation checkpointing
"""

import sys

import torch
import torch.distributed as dist

import parallel as par
from grpo import packed_logprobs, policy_loss
from test_grpo import grads_of, packed_toy_groups, toy_batch
from tiny import tiny_model

mode, out = sys.argv[1], sys.argv[2]
d = par.init_distributed("cpu")
if mode == "plain":
    model, ids, attn, mask, adv = toy_batch()
    mine = [[0, 1, 2], [3, 4, 5]][d.rank]             # uneven token counts on purpose
    total = par.all_sum([mask[mine].sum().item()], d)[0]
    grad = grads_of(model, ids, attn, mask, adv, [mine], total)
    dist.all_reduce(grad)
else:
    groups, adv = packed_toy_groups()
    model = tiny_model(seed=8).train()
    par.shard_model(model, d, checkpointing=mode == "fsdp-checkpointing")
    mine = [0, 1] if d.rank == 0 else [2]             # groups of different sizes on each rank
    total = sum(len(c) for _, cs in groups for c in cs)
    rows = [r for g in mine for r in range(sum(len(groups[k][1]) for k in range(g)),
                                             sum(len(groups[k][1]) for k in range(g + 1)))]
    lp = packed_logprobs(model, [groups[g] for g in mine])
    width = max(len(x) for x in lp)
    values = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in lp])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(len(x)), (0, width - len(x))) for x in lp])
    loss, _ = policy_loss(values, values.detach(), adv[rows], mask, total_tokens=total)
    (loss * d.world).backward()
    grad = torch.cat([par.full_tensor(p.grad).flatten() for p in model.parameters()])
if d.rank == 0:
    torch.save(grad, out)
# Both ranks leave together: rank 1 tearing its groups down while rank 0 still writes aborted once in CI.
del model
dist.barrier()
par.close_distributed()
