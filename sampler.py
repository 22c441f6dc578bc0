"""Batched sampling with a KV cache, for Llama-family decoders (Llama, SmolLM, Qwen2, Qwen3, Mistral).

    gen = generate(model, prompts, max_new_tokens=256, num_samples=8, temperature=1.0,
                   stop_token_ids=[eos], generator=torch.Generator().manual_seed(0))
    gen.tokens[i * 8 + j]   # sample j of prompt i, ending with the stop token when one ended it

The transformer body is the Hugging Face module's own (its norms, projections, MLPs and rotary
embedding); only attention and the cache are done here, because HF's dynamic cache concatenates
every step and cannot share one prefill between the samples of a prompt.

Cache layout. Each row keeps its tokens left-aligned in a preallocated (rows, kv_heads, capacity,
head_dim) buffer per layer, with its own length. A row's position ids are simply its slot indices,
so prompts of different lengths need no padding inside the sequence and no position-id fix-ups;
batches of chunks are right-padded, and the pad slots lie past the row's length, where attention
never looks and the next write overwrites them. Every attention call gets an explicit boolean mask
(key slot <= query position), never `is_causal`, because a chunk appended to an existing cache is
not top-left aligned.

Sharing and continuing. Each unique prompt is prefilled once; its cache is then copied to its
`num_samples` rows and the first token is sampled per row. With `keep_cache=True` the returned
`Generation.cache` holds every row's cache, and `generate(model, chunks, cache=gen.cache)` appends
`chunks[r]` to row r (after the row's last sampled token, which was never fed to the model) and
samples on from there. RRR uses this twice: prompt + attempt 1 + reflection prompt is prefilled once
and shared by the G reflections, then each reflection row is continued with the retry instruction,
so no token of the shared prefix is ever recomputed.

Rows that end stop costing compute: when at most half of the batch is still running, the finished
rows are dropped from the working batch (their caches are set aside when `keep_cache` is on).

The model must be an ordinary (unsharded) module; under FSDP, sample from an unsharded copy.
"""

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    keys: list[torch.Tensor]     # per layer: (rows, kv_heads, capacity, head_dim)
    values: list[torch.Tensor]   # same shape as keys
    lengths: torch.Tensor        # (rows,) slots filled in each row
    last_token: torch.Tensor     # (rows,) the last sampled token, not yet in the cache

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]


@dataclass
class Generation:
    tokens: list[list[int]]        # generated ids per row, including the stop token that ended it
    logprobs: list[list[float]]    # log p(token) under softmax(logits / temperature), before top-k/p
    finished: list[bool]           # True when a stop token ended the row (else it hit max_new_tokens)
    cache: KVCache | None = None   # with keep_cache=True: continue the rows with generate(cache=...)


def _layers(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ValueError(f"sampler supports Llama-family decoders; {type(model).__name__} is not one")
    return body


def _attention_geometry(model):
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _new_cache(model, rows, capacity, device, dtype) -> KVCache:
    _, kv_heads, head_dim = _attention_geometry(model)
    shape = (rows, kv_heads, capacity, head_dim)
    n_layers = model.config.num_hidden_layers
    return KVCache(keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
                   values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
                   lengths=torch.zeros(rows, dtype=torch.long, device=device),
                   last_token=torch.zeros(rows, dtype=torch.long, device=device))


# The cache is the largest thing the sampler holds, so every operation on it below works one layer
# at a time and drops the old layer before the next: the transient is one layer's buffer, never a
# second copy of the whole cache.

def _grow(cache: KVCache, capacity: int) -> KVCache:
    """Gives every row of `cache` room for `capacity` slots, in place."""
    rows, kv_heads, old, head_dim = cache.keys[0].shape
    if old >= capacity:
        return cache
    used = int(cache.lengths.max())
    for layers in (cache.keys, cache.values):
        for i, t in enumerate(layers):
            grown = t.new_zeros(rows, kv_heads, capacity, head_dim)
            grown[:, :, :used] = t[:, :, :used]
            layers[i] = grown
    return cache


def _take_rows(cache: KVCache, index: torch.Tensor) -> KVCache:
    """Keeps rows `index` of `cache`, in that order, in place; index may repeat rows (one prefill
    shared by the samples of a prompt) or permute them."""
    for layers in (cache.keys, cache.values):
        for i, t in enumerate(layers):
            layers[i] = t[index]
    cache.lengths, cache.last_token = cache.lengths[index], cache.last_token[index]
    return cache


def _reorder_front(cache: KVCache, index: torch.Tensor):
    """Rows [0, len(index)) of `cache` <- rows `index` (distinct), in place."""
    m = index.numel()
    for layers in (cache.keys, cache.values):
        for t in layers:
            t[:m] = t[index]
    cache.lengths[:m] = cache.lengths[index]
    cache.last_token[:m] = cache.last_token[index]


def _front(cache: KVCache, n: int) -> KVCache:
    """The working batch: views of rows [0, n), so decoding writes straight into `cache`."""
    return KVCache([k[:n] for k in cache.keys], [v[:n] for v in cache.values],
                   cache.lengths[:n].clone(), cache.last_token[:n].clone())


@dataclass
class _Linear:
    """A projection prepared for decoding: q/k/v and gate/up are fused into one matrix each."""
    weight: torch.Tensor                 # (out, in)
    bias: torch.Tensor | None = None
    weight_t: torch.Tensor | None = None  # (in, out) contiguous copy, CPU only: see _apply

    @staticmethod
    def of(*modules) -> "_Linear":
        weight = _joined([m.weight for m in modules])
        if weight is None:
            weight = torch.cat([m.weight for m in modules])
        biases = [m.bias for m in modules]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        # On CPU, MKL's matrix-vector product runs about 2x faster with the weight stored (in, out):
        # one extra copy of the weights buys batch-1 decoding close to memory bandwidth
        # (bench/sampler.py, BENCHMARKS.md).
        weight_t = weight.t().contiguous() if weight.device.type == "cpu" else None
        return _Linear(weight, bias, weight_t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1 and _ONE_ROW_BLAS[0] and flat.dtype == torch.float32:
            # One row is a matrix-vector product bound by reading the weights. MKL's (torch) runs
            # it on one core at ~16 GB/s here; OpenBLAS's (numpy) splits it over all cores and
            # reaches ~27 GB/s, close to the machine's read bandwidth (BENCHMARKS.md).
            y = torch.from_numpy(flat.numpy() @ self.weight_t.numpy())
        else:
            # For more rows (W @ x^T)^T beats F.linear by 1.2-1.8x (measured, fp32).
            y = (self.weight @ flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _joined(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The (sum of outs, in) matrix that `weights` form when they lie back to back in one buffer (see
    `fuse_projections`), as a view; None when they do not."""
    first, offset = weights[0], weights[0].storage_offset()
    for w in weights:
        if (w.untyped_storage()._cdata != first.untyped_storage()._cdata or w.storage_offset() != offset
                or not w.is_contiguous() or w.shape[1:] != first.shape[1:]):
            return None
        offset += w.numel()
    return first.as_strided((sum(w.shape[0] for w in weights), *first.shape[1:]), first.stride())


@torch.no_grad()
def fuse_projections(model):
    """Moves each layer's q/k/v and gate/up weights (and biases) into one buffer each, back to back,
    leaving the module's parameters as views into it: decoding then multiplies by q/k/v (and by
    gate/up) as one matrix without keeping a fused copy beside the weights. The module computes
    exactly as before."""
    for layer in _layers(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            for name in ("weight", "bias"):
                params = [getattr(m, name) for m in group]
                if any(p is None for p in params):
                    continue
                fused = torch.cat([p.detach() for p in params])
                start = 0
                for p in params:
                    p.data = fused[start:start + p.shape[0]]
                    start += p.shape[0]
    return model


# Set by `generate` while a one-row working batch decodes on CPU with torch limited to one thread:
# torch's idle OpenMP threads spin-wait and would take the cores from OpenBLAS's.
_ONE_ROW_BLAS = [False]


@dataclass
class _Weights:
    layers: list[dict]
    lm_head: _Linear
    rope: tuple[torch.Tensor, torch.Tensor] | None = None   # cos, sin tables by position


_prepared = weakref.WeakKeyDictionary()   # model -> (parameter versions, _Weights)


def _prepare(model) -> _Weights:
    """Fused (and on CPU transposed) copies of the weights, rebuilt only when a parameter changed:
    optimizer steps and load_state_dict update parameters in place, which bumps their version."""
    versions = tuple((p.data_ptr(), p._version) for p in model.parameters())
    hit = _prepared.get(model)
    if hit is not None and hit[0] == versions:
        return hit[1]
    body = _layers(model)
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(dict(
            qkv=_Linear.of(attn.q_proj, attn.k_proj, attn.v_proj), o=_Linear.of(attn.o_proj),
            gate_up=_Linear.of(mlp.gate_proj, mlp.up_proj), down=_Linear.of(mlp.down_proj)))
    weights = _Weights(layers, _Linear.of(model.lm_head))
    _prepared[model] = (versions, weights)
    return weights


def release(model):
    """Frees the fused (and on CPU transposed) weight copies kept for `model`, about 1.7x its size.
    They are rebuilt on the next `generate`; a training loop whose weights change every step anyway
    calls this after sampling so that the copies do not sit in memory during the update."""
    _prepared.pop(model, None)


def _forward_chunk(model, weights: _Weights, cache: KVCache, tokens: torch.Tensor,
                   chunk_lens: torch.Tensor) -> torch.Tensor:
    """Appends `tokens` (rows, C), right-padded to C with row r's real length chunk_lens[r], to the
    cache and returns the final-norm hidden state at each row's last real token: (rows, hidden)."""
    body = _layers(model)
    heads, kv_heads, head_dim = _attention_geometry(model)
    groups = heads // kv_heads
    rows, C = tokens.shape
    start = cache.lengths                                         # (rows,)
    positions = start[:, None] + torch.arange(C, device=tokens.device)  # (rows, C)
    used = int((start + C).max())
    slots = torch.arange(used, device=tokens.device)
    # Query at position p sees key slots <= p. The grouped query heads are folded into the query
    # axis below, so a chunk's mask is repeated per group: (rows, 1, groups * C, used). A decoding
    # step's single query row is the same for every group and broadcasts: (rows, 1, 1, used).
    mask = (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)
    if groups > 1 and C > 1:
        mask = mask.repeat(1, 1, groups, 1)
    row_index = torch.arange(rows, device=tokens.device)[:, None]   # (rows, 1)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    h = body.embed_tokens(tokens)                                # (rows, C, hidden)
    cos, sin = _rope_table(body, weights, h, used)
    cos, sin = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)   # (rows, C, 1, head_dim)
    for i, (layer, w) in enumerate(zip(body.layers, weights.layers)):
        attn = layer.self_attn
        qkv = w["qkv"](_norm(layer.input_layernorm, h))          # (rows, C, q_size + 2 * kv_size)
        v = qkv[..., q_size + kv_size:].reshape(rows, C, kv_heads, head_dim)
        qk = qkv[..., :q_size + kv_size].reshape(rows, C, heads + kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            qk = torch.cat([attn.q_norm(qk[:, :, :heads]), attn.k_norm(qk[:, :, heads:])], dim=2)
        qk = qk * cos + _rotate_half(qk) * sin                   # q and k rotated in one pass
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:]
        cache.keys[i][row_index, :, positions] = k                # slots (rows, C)
        cache.values[i][row_index, :, positions] = v
        # Fold the `groups` query heads that share a kv head into the query axis, so SDPA sees
        # one kv head per query block and the cache is never expanded: (rows, kv_heads, groups*C, d).
        q = q.reshape(rows, kv_heads, groups * C, head_dim)
        keys, values = cache.keys[i][:, :, :used], cache.values[i][:, :, :used]
        if C == 1:  # decoding: two small matmuls beat SDPA's fallback for a boolean mask on CPU
            scores = (q @ keys.transpose(-1, -2)) * attn.scaling         # (rows, kv_heads, groups, used)
            out = scores.masked_fill_(~mask, float("-inf")).softmax(-1) @ values
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        out = out.view(rows, heads, C, head_dim).transpose(1, 2).reshape(rows, C, heads * head_dim)
        h = h + w["o"](out)
        gate, up = w["gate_up"](_norm(layer.post_attention_layernorm, h)).chunk(2, dim=-1)
        h = h + w["down"](layer.mlp.act_fn(gate) * up)
    cache.lengths = start + chunk_lens
    last = h[torch.arange(rows, device=h.device), chunk_lens - 1]   # (rows, hidden)
    return _norm(body.norm, last)


_PLAIN_RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def _norm(module, x):
    """The module's RMSNorm in fewer ops where it is the plain formula. In float32 the fused kernel
    with the weight is bit-identical to the module; in lower precision the module rounds the
    normalised value before the weight multiply, which is kept."""
    if type(module).__name__ not in _PLAIN_RMS_NORMS:
        return module(x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps=module.variance_epsilon)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon)
    return module.weight * y.to(x.dtype)


def _rope_table(body, weights: "_Weights", like: torch.Tensor, length: int):
    """cos, sin for positions 0..length-1 from the model's own rotary embedding, (length, head_dim),
    computed once per generate call and extended when a row outgrows it."""
    if weights.rope is None or weights.rope[0].shape[0] < length:
        size = max(length, 2 * (weights.rope[0].shape[0] if weights.rope else 0), 256)
        positions = torch.arange(size, device=like.device)[None]
        cos, sin = body.rotary_emb(like, positions)
        weights.rope = (cos[0], sin[0])
    return weights.rope


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _logits(model, weights: _Weights, hidden: torch.Tensor) -> torch.Tensor:
    logits = weights.lm_head(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _sample(logits, temperature, top_k, top_p, generator):
    """logits (rows, vocab) -> (token (rows,), logprob (rows,)), logprob before truncation."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    logprobs = (logits / temperature).log_softmax(-1)
    kept = logprobs
    if top_k and top_k < kept.shape[-1]:
        kth = kept.topk(top_k, dim=-1).values[:, -1:]
        kept = kept.masked_fill(kept < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = kept.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop = torch.zeros_like(kept, dtype=torch.bool).scatter(-1, order, mass_before > top_p)
        kept = kept.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform per row against the cumulative distribution. torch.multinomial
    # draws an exponential per vocabulary entry, which costs more than a forward step of a small model.
    cdf = kept.exp().cumsum(-1)                                   # (rows, vocab)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    token = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    return token, logprobs.gather(-1, token[:, None])[:, 0]


def _pad(chunks: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in chunks)
    tokens = torch.zeros(len(chunks), width, dtype=torch.long)
    for r, c in enumerate(chunks):
        tokens[r, :len(c)] = torch.tensor(c, dtype=torch.long)
    return tokens.to(device), torch.tensor([len(c) for c in chunks], device=device)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids=(),
             generator: torch.Generator | None = None, cache: KVCache | None = None,
             keep_cache: bool = False) -> Generation:
    """Samples `num_samples` continuations of each prompt; rows are prompt-major (row i*n + j).

    prompts: token-id lists. With `cache` (from a previous `keep_cache=True` call), prompts[r] is the
    chunk to append to cache row r, and len(prompts) must equal cache.rows. That cache is consumed:
    it is grown and written in place, so it cannot be continued twice.
    temperature == 0 means greedy (then logprobs are of the raw logits).
    """
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
    if cache is not None and len(prompts) != cache.rows:
        raise ValueError(f"{len(prompts)} chunks for a cache of {cache.rows} rows")
    if cache is None and any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    if not prompts:
        return Generation([], [], [], cache)

    if cache is None:
        chunks = [list(p) for p in prompts]
        start = [0] * len(prompts)
    else:  # the last sampled token of each row was never fed: it opens the row's chunk
        last = cache.last_token.tolist()
        chunks = [[last[r]] + list(p) for r, p in enumerate(prompts)]
        start = cache.lengths.tolist()
    widest = max(len(c) for c in chunks)
    capacity = max(max(s + len(c) for s, c in zip(start, chunks)) + max_new_tokens,
                   max(start) + widest)
    if cache is None:
        cache = _new_cache(model, len(prompts), capacity, device, model.lm_head.weight.dtype)
    else:
        _grow(cache, capacity)

    tokens_in, chunk_lens = _pad(chunks, device)
    weights = _prepare(model)
    hidden = _forward_chunk(model, weights, cache, tokens_in, chunk_lens)       # one prefill per unique prompt
    logits = _logits(model, weights, hidden)
    if num_samples > 1:
        share = torch.arange(cache.rows, device=device).repeat_interleave(num_samples)
        _take_rows(cache, share)
        logits = logits[share]

    rows = cache.rows
    out_tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    n_new = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    # The working batch is cache rows [0, n); cache row i holds row order[i] of the result.
    order, n = torch.arange(rows, device=device), rows
    work = _front(cache, n)
    threads = torch.get_num_threads()
    one_row_blas = device.type == "cpu" and threads > 1

    try:
        for step in range(max_new_tokens):
            active = order[:n]
            token, logprob = _sample(logits, temperature, top_k, top_p, generator)   # (n,)
            running = ~finished[active]
            # Rows that already finished stay in the working batch until the next compaction; their
            # draws are ignored.
            rows_now = active[running]
            out_tokens[rows_now, step] = token[running]
            out_logprobs[rows_now, step] = logprob[running]
            n_new[rows_now] += 1
            work.last_token = torch.where(running, token, work.last_token)
            if stop.numel():
                finished[rows_now] = torch.isin(token[running], stop)
            still = ~finished[active]
            n_still = int(still.sum())
            if n_still == 0 or step == max_new_tokens - 1:
                break
            if n_still <= n // 2:    # the running rows move to the front; the working batch shrinks to them
                keep = still.nonzero()[:, 0]
                moved = torch.cat([keep, (~still).nonzero()[:, 0]])
                cache.lengths[:n], cache.last_token[:n] = work.lengths, work.last_token
                # With keep_cache the finished rows' caches are kept too, behind the working batch.
                _reorder_front(cache, moved if keep_cache else keep)
                order[:n] = order[:n][moved]
                n, token, still = keep.numel(), token[keep], still[keep]
                work = _front(cache, n)
            feed = torch.where(still, token, work.last_token)[:, None]
            before = work.lengths.clone()
            if one_row_blas and n == 1 and not _ONE_ROW_BLAS[0]:
                _ONE_ROW_BLAS[0] = True          # see _Linear; undone in `finally`
                torch.set_num_threads(1)
            hidden = _forward_chunk(model, weights, work, feed, torch.ones_like(before))
            logits = _logits(model, weights, hidden)
            work.lengths = torch.where(still, work.lengths, before)    # finished rows do not grow
    finally:
        _restore_threads(threads)

    final_cache = None
    if keep_cache:
        cache.lengths[:n], cache.last_token[:n] = work.lengths, work.last_token
        final_cache = _take_rows(cache, torch.argsort(order))       # back in the order of the result
    counts = n_new.tolist()
    toks, lps = out_tokens.tolist(), out_logprobs.tolist()
    return Generation(tokens=[t[:n] for t, n in zip(toks, counts)],
                      logprobs=[lp[:n] for lp, n in zip(lps, counts)],
                      finished=finished.tolist(), cache=final_cache)


def _restore_threads(threads):
    if _ONE_ROW_BLAS[0]:
        _ONE_ROW_BLAS[0] = False
        torch.set_num_threads(threads)


def main():
    import argparse
    import time

    from model import load_model, stop_token_ids

    ap = argparse.ArgumentParser(description="Sample answers to a chat prompt with the KV-cache sampler.")
    ap.add_argument("prompt", nargs="?", default="Using the numbers [44, 19, 35], make 98 with + - * /.",
                    help="user message")
    ap.add_argument("--model", default=None, help="HF model path or id (default: embedded SmolLM2-135M)")
    ap.add_argument("--num-samples", type=int, default=4, help="answers to sample")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    start = time.perf_counter()
    gen = generate(model, [ids], max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                   temperature=args.temperature, stop_token_ids=stop_token_ids(tokenizer, model),
                   generator=torch.Generator(model.device).manual_seed(args.seed))
    seconds = time.perf_counter() - start
    for j, tokens in enumerate(gen.tokens):
        print(f"--- sample {j} ({len(tokens)} tokens, {'stopped' if gen.finished[j] else 'truncated'})")
        print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"--- {sum(map(len, gen.tokens))} tokens in {seconds:.1f} s")


if __name__ == "__main__":
    main()
