"""Batched sampling with a KV cache, for Llama-family decoders (Llama, SmolLM, Qwen2, Qwen3, Mistral).

    gen = generate(model, prompts, max_new_tokens=256, num_samples=8, temperature=1.0,
                   stop_token_ids=[eos], generator=torch.Generator(model.device).manual_seed(0))
    gen.tokens[i * 8 + j]   # sample j of prompt i, ending with the stop token when one ended it

The transformer body is the Hugging Face module's own (norms, projections, MLPs, rotary embedding);
only attention and the cache are done here, because HF's dynamic cache concatenates every step and
cannot share one prefill between the samples of a prompt.

Cache layout: per layer a preallocated (rows, kv_heads, capacity, head_dim) buffer; each row keeps its
tokens left-aligned with its own length, so a row's position ids are its slot indices and prompts of
different lengths need no padding inside the sequence. Chunks are right-padded; pad slots lie past
the row's length, where attention never looks. Every attention call gets an explicit boolean mask
(key slot <= query position), never `is_causal`: a chunk appended to a cache is not top-left aligned.

Sharing and continuing: each unique prompt is prefilled once and its cache copied to its
`num_samples` rows. With `keep_cache=True`, `generate(model, chunks, cache=gen.cache)` appends
`chunks[r]` to row r (after the row's last sampled token, never fed yet) and samples on. RRR prefills
prompt + attempt + reflection prompt once for G reflections, then continues each with the retry.

A decode step has fixed shapes and never waits for the device: the attention window grows in blocks
the host computes itself. Only every `CHECK_EVERY` steps does the host read how many rows still run
(its one sync); when at most half do, they move to the front and the working batch shrinks to them.
tests/test_sampler.py counts the syncs. The model must be unsharded; under FSDP, sample from a copy.

The last section, "performance only", holds what changes speed and not samples: fused projections,
the CPU matrix route, CUDA graphs (`cuda_graphs=False` runs the same kernels eagerly).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import chat_ids, load_model, right_pad, stop_token_ids

CHECK_EVERY = 8   # decode steps between the host's looks at how many rows still run (k >= 4)


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


def decoder_body(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ValueError(f"sampler supports Llama-family decoders; {type(model).__name__} is not one")
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        # Gemma-2's softcapped logits and attention (and its extra norms) are not computed here.
        raise ValueError(f"sampler supports Llama-family decoders; {type(model).__name__} softcaps logits")
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

def _grow(cache: KVCache, capacity: int, used: int) -> KVCache:
    """Gives every row of `cache` room for `capacity` slots, in place; `used` >= every row's length."""
    rows, kv_heads, old, head_dim = cache.keys[0].shape
    if old >= capacity:
        return cache
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
    """Rows [0, len(index)) of `cache` <- rows `index` (distinct), in place: the buffers keep their
    addresses, which captured steps rely on."""
    m = index.numel()
    for t in (*cache.keys, *cache.values, cache.lengths, cache.last_token):
        t[:m] = t[index]


def _front(cache: KVCache, n: int) -> KVCache:
    """The working batch: views of rows [0, n), so decoding reads and writes `cache` itself."""
    return KVCache([k[:n] for k in cache.keys], [v[:n] for v in cache.values],
                   cache.lengths[:n], cache.last_token[:n])


@dataclass
class _Weights:
    """What decoding reads besides the modules, built per call: q/k/v and gate/up as one matrix each
    (views when `fuse_projections` laid them out so, else copies that live for the call) and the
    rotary tables for every position the call can reach."""
    layers: list[dict]
    cos: torch.Tensor   # (capacity, head_dim)
    sin: torch.Tensor


def _prepare(model, capacity: int, like: torch.Tensor) -> _Weights:
    def one_matrix(tensors):
        joined = _joined(tensors)
        return torch.cat(tensors) if joined is None else joined

    def fused(*modules):      # (weight, bias) of the modules as one projection
        biases = [m.bias for m in modules]
        bias = None if any(b is None for b in biases) else one_matrix(biases)
        return one_matrix([m.weight for m in modules]), bias

    body = decoder_body(model)
    layers = [dict(qkv=fused(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                   gate_up=fused(layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in body.layers]
    cos, sin = body.rotary_emb(like, torch.arange(capacity, device=like.device)[None])
    return _Weights(layers, cos[0], sin[0])


def _forward(model, w: _Weights, cache: KVCache, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Writes `tokens` (rows, C) to row r's cache slots lengths[r] .. lengths[r] + C - 1 and returns the
    last layer's hidden states (rows, C, hidden), before the final norm. Attention reads slots [0, window)
    up to each query's own position; `window` comes from the host, so nothing here waits for the device.
    Lengths are not advanced: the caller knows which tokens count."""
    body = decoder_body(model)
    heads, kv_heads, head_dim = _attention_geometry(model)
    groups = heads // kv_heads
    rows, C = tokens.shape
    positions = cache.lengths[:, None] + torch.arange(C, device=tokens.device)   # (rows, C)
    # Query at position p sees key slots <= p. The grouped query heads are folded into the query
    # axis below, so a chunk's mask is repeated per group: (rows, 1, groups * C, window). A decoding
    # step's single query row is the same for every group and broadcasts: (rows, 1, 1, window).
    mask = (torch.arange(window, device=tokens.device) <= positions[:, :, None]).unsqueeze(1)
    if groups > 1 and C > 1:
        mask = mask.repeat(1, 1, groups, 1)
    row_index = torch.arange(rows, device=tokens.device)[:, None]   # (rows, 1)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    cos, sin = w.cos[positions].unsqueeze(2), w.sin[positions].unsqueeze(2)   # (rows, C, 1, head_dim)

    h = body.embed_tokens(tokens)                                # (rows, C, hidden)
    for i, (layer, lw) in enumerate(zip(body.layers, w.layers)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _linear(layer.input_layernorm(h), *lw["qkv"])   # (rows, C, q_size + 2 * kv_size)
        v = qkv[..., q_size + kv_size:].reshape(rows, C, kv_heads, head_dim)
        qk = qkv[..., :q_size + kv_size].reshape(rows, C, heads + kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            qk = torch.cat([attn.q_norm(qk[:, :, :heads]), attn.k_norm(qk[:, :, heads:])], dim=2)
        qk = qk * cos + _rotate_half(qk) * sin                   # q and k rotated in one pass
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:]
        cache.keys[i][row_index, :, positions] = k                # slots (rows, C)
        cache.values[i][row_index, :, positions] = v
        # Fold the `groups` query heads that share a kv head into the query axis, so attention sees
        # one kv head per query block and the cache is never expanded: (rows, kv_heads, groups*C, d).
        # (Contiguous, or SDPA on CPU takes its slow generic path: the rotation can leave the head
        # axis strided.)
        q = q.reshape(rows, kv_heads, groups * C, head_dim).contiguous()
        keys, values = cache.keys[i][:, :, :window], cache.values[i][:, :, :window]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        out = out.reshape(rows, heads, C, head_dim).transpose(1, 2).reshape(rows, C, heads * head_dim)
        h = h + _linear(out, attn.o_proj.weight, attn.o_proj.bias)
        gate, up = _linear(layer.post_attention_layernorm(h), *lw["gate_up"]).chunk(2, dim=-1)
        h = h + _linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
    return h


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(rows, hidden) last-layer states -> (rows, vocab) fp32 logits: the final norm, then the head."""
    return _linear(decoder_body(model).norm(hidden), model.lm_head.weight, model.lm_head.bias).float()


def _decode_step(model, w: _Weights, work: KVCache, window: int) -> torch.Tensor:
    """Feeds every working row's last sampled token: (rows, vocab) logits. Fixed shapes for a given
    working batch and window, no host sync: this is what a CUDA graph captures."""
    return _logits(model, _forward(model, w, work, work.last_token[:, None], window)[:, 0])


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
    """Chunks -> right-padded token ids (rows, longest) and each chunk's length, on `device`."""
    return right_pad(chunks).to(device), torch.tensor([len(c) for c in chunks], device=device)


def window_block_for(device: torch.device) -> int:
    """Cache capacity and attention windows are multiples of this. On CPU a step reads little more
    than the slots it needs; on CUDA every new window of a captured step is a new capture (the block
    is the same without capture, so that the kernels, and the samples, are too)."""
    return 256 if device.type == "cuda" else 16


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids=(),
             generator: torch.Generator | None = None, cache: KVCache | None = None,
             keep_cache: bool = False, cuda_graphs: bool = True, progress=None) -> Generation:
    """Samples `num_samples` continuations of each prompt; rows are prompt-major (row i*n + j).

    prompts: token-id lists. With `cache` (from a previous `keep_cache=True` call), prompts[r] is the
    chunk to append to cache row r, and len(prompts) must equal cache.rows. That cache is consumed:
    it is grown and written in place, so it cannot be continued twice.
    temperature == 0 means greedy (then logprobs are of the raw logits).
    cuda_graphs: on CUDA, replay each decode-step shape as a captured graph; False decodes eagerly.
    progress: called with the number of decode steps done, every CHECK_EVERY steps (the host looks then).
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
    side = torch.cuda.Stream(device) if cuda_graphs and device.type == "cuda" else None
    window_block = window_block_for(device)

    if cache is None:
        chunks, start = [list(p) for p in prompts], [0] * len(prompts)
    else:  # the last sampled token of each row was never fed: it opens the row's chunk
        last = cache.last_token.tolist()
        chunks, start = [[last[r]] + list(p) for r, p in enumerate(prompts)], cache.lengths.tolist()
    longest = max(s + len(c) for s, c in zip(start, chunks))    # the longest row after the prefill
    prefill_window = max(start) + max(len(c) for c in chunks)    # right padding writes up to here
    capacity = _round_up(max(longest + max_new_tokens, prefill_window), window_block)
    if cache is None:
        cache = _new_cache(model, len(prompts), capacity, device, model.lm_head.weight.dtype)
    else:
        _grow(cache, capacity, max(start))
    w = _prepare(model, capacity, cache.keys[0])

    tokens_in, chunk_lens = _pad(chunks, device)
    hidden = _forward(model, w, cache, tokens_in, prefill_window)   # one prefill per unique prompt
    cache.lengths += chunk_lens
    logits = _logits(model, hidden[torch.arange(len(chunks), device=device), chunk_lens - 1])
    if num_samples > 1:
        share = torch.arange(cache.rows, device=device).repeat_interleave(num_samples)
        _take_rows(cache, share)
        logits = logits[share]

    rows = cache.rows
    out_tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    # The working batch is cache rows [0, n); cache row i holds row order[i] of the result, and
    # running[i] says it has not sampled a stop token yet.
    order, n = torch.arange(rows, device=device), rows
    running = torch.ones(rows, dtype=torch.bool, device=device)
    work, step_key, step_fn = _front(cache, n), None, None
    for step in range(max_new_tokens):
        token, logprob = _sample(logits, temperature, top_k, top_p, generator)   # (n,)
        active = order[:n]
        # Rows that already stopped stay in the working batch until the next check: their draws
        # are not recorded and they feed their stop token again without growing.
        out_tokens[active, step] = torch.where(running, token, -1)
        out_logprobs[active, step] = logprob
        work.last_token.copy_(torch.where(running, token, work.last_token))
        if stop.numel():
            running &= ~(token[:, None] == stop).any(-1)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % CHECK_EVERY == 0:
            still = int(running.sum())     # the host sync of these CHECK_EVERY steps
            if progress:
                progress(step + 1)
            if still == 0:
                break
            if still <= n // 2:     # the running rows move to the front; the working batch shrinks to them
                moved = torch.argsort(running.to(torch.int8), descending=True, stable=True)
                finished[active] = ~running
                # With keep_cache the finished rows' caches are kept too, behind the working batch.
                _reorder_front(cache, moved if keep_cache else moved[:still])
                order[:n] = active[moved]
                n, running = still, running[moved[:still]]
                work = _front(cache, n)
        # No row is longer than the longest after the prefill plus the tokens fed since.
        window = min(capacity, _round_up(longest + step + 1, window_block))
        if step_key != (n, window):
            step_key, step_fn, logits = (n, window), None, None   # the old graph goes before the next one
            step_fn = _step_function(model, w, work, window, side)
        logits = step_fn()
        work.lengths += running                  # stopped rows do not grow
    finished[order[:n]] = ~running
    work = step_fn = logits = w = None   # views, a graph's pool and fused copies would outlive the old cache

    final_cache = None
    if keep_cache:
        final_cache = _take_rows(cache, torch.argsort(order))       # back in the order of the result
    toks, lps = out_tokens.tolist(), out_logprobs.tolist()
    counts = [t.index(-1) if -1 in t else len(t) for t in toks]    # -1 marks a step after the row stopped
    return Generation(tokens=[t[:k] for t, k in zip(toks, counts)],
                      logprobs=[lp[:k] for lp, k in zip(lps, counts)],
                      finished=finished.tolist(), cache=final_cache)


# --- performance only: what changes speed and not samples (a first reading can skip it) ---------------

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
    exactly as before. Works a layer at a time, and skips what is already laid out so."""
    for layer in decoder_body(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            for name in ("weight", "bias"):
                params = [getattr(m, name) for m in group]
                if any(p is None for p in params) or _joined(params) is not None:
                    continue
                fused = torch.cat([p.detach() for p in params])
                start = 0
                for p in params:
                    p.data = fused[start:start + p.shape[0]]
                    start += p.shape[0]
    return model


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and flat.shape[0] <= 64:
        # Decoding on CPU: MKL runs (W @ x^T)^T up to 1.2x faster than F.linear for 8-32 rows (fp32,
        # a step's projections measured: BENCHMARKS.md). A prefill's many rows keep F.linear: there
        # the transposed result would slow every op after it.
        y = (weight @ flat.t()).t().reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _step_function(model, w: _Weights, work: KVCache, window: int, side: "torch.cuda.Stream | None"):
    """A function running one decode step of this shape: eagerly, or with a CUDA stream `side`, as a
    replay of the step captured on that stream as a CUDA graph. The graph reads the working rows'
    tokens and lengths from the cache's own buffers, which decoding updates in place, and writes its
    logits to one output buffer that each replay reuses."""
    if side is None:
        return lambda: _decode_step(model, w, work, window)
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        # Capture needs one warm-up run first; it writes the cache slots that the replay writes again.
        _decode_step(model, w, work, window)
        # capture_begin/end rather than the torch.cuda.graph context, which synchronizes the device
        # and empties the allocator's cache at every capture.
        graph.capture_begin()
        logits = _decode_step(model, w, work, window)
        graph.capture_end()
    main.wait_stream(side)

    def replay():
        graph.replay()
        return logits
    return replay


def main():
    import argparse
    import time

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
    ids = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}])
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
