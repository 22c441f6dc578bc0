"""Run by tests/test_grpo.py under torchrun: each rank takes its share of the toy batch, divides its
loss by the GLOBAL trained-token count, and the gradients are summed over ranks (gloo)."""

import sys

import torch
import torch.distributed as dist

from test_grpo import grads_of, toy_batch

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, ids, attn, mask, adv = toy_batch()
mine = [[0, 1, 2], [3, 4, 5]][rank]                  # uneven token counts on purpose
total = torch.tensor(mask[mine].sum().item())
dist.all_reduce(total)                                # global trained tokens
grad = grads_of(model, ids, attn, mask, adv, [mine], total.item())
dist.all_reduce(grad)
if rank == 0:
    torch.save(grad, sys.argv[1])
dist.destroy_process_group()
