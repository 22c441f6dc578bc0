"""Counts what a block of PyTorch code asks of the device, op by op.

Running time: none of its own; a module that bench/sampler.py, bench/gpu.py and tests import (run as a
script, it only prints this help). It counts:

- compute ops: on a GPU each is about one kernel launch;
- view ops: reshapes, slices and transposes, which launch nothing;
- host syncs: the host waits for the device's result (reading a value with `int`/`item`/`bool`,
  `nonzero`, boolean-mask indexing, output sizes that depend on values, `tolist`, `numpy`).

In Python, from the repository's root folder:

    from bench.op_counts import count_ops
    from model import load_model
    from sampler import generate

    model, tokenizer = load_model(None, device="cpu")          # the embedded SmolLM2-135M
    with count_ops() as counts:
        generate(model, [tokenizer.encode("Hello")], max_new_tokens=8)
    print(counts.compute, counts.views, counts.syncs)

On a CPU nothing waits, but the same calls are the ones that would; so tests count syncs on CPU.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops whose result (or its size) the host must read before it can go on.
_SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.masked_select.default, aten.equal.default, aten.allclose.default, aten.repeat_interleave.Tensor,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
# Indexing syncs when an index is a boolean mask (it runs `nonzero` inside).
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


@dataclass
class OpCounts:
    compute: int = 0
    views: int = 0
    syncs: int = 0


class _CountDispatch(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING or (func in _INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.counts.syncs += 1
        elif func._schema.is_mutable or not func.is_view:
            self.counts.compute += 1
        else:
            self.counts.views += 1
        return func(*args, **(kwargs or {}))


class _CountFunctions(TorchFunctionMode):
    """`tolist` and `numpy` read a tensor without an aten op (on CPU), so they are counted here."""

    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.counts.syncs += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops():
    counts = OpCounts()
    with _CountFunctions(counts), _CountDispatch(counts):
        yield counts


def per_step(run) -> OpCounts:
    """Ops per decode step of `run(n)`, a call that generates n tokens: a 17-token call less a 9-token
    one, over the 8 steps between. On CUDA both calls capture the same step shapes when their windows
    agree (prompts and 17 tokens within one 256-slot block), so the 8 steps count replays only."""
    with count_ops() as nine:
        run(9)
    with count_ops() as seventeen:
        run(17)
    return OpCounts(*((getattr(seventeen, k) - getattr(nine, k)) / 8 for k in ("compute", "views", "syncs")))


if __name__ == "__main__":          # nothing to run here: the help says how to use the module
    import argparse
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._cli import Help
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.parse_args()
    ap.print_help()
