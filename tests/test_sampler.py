"""sampler.generate against independent references: HF `generate` and teacher-forced HF forward passes."""

import pytest
import torch

from sampler import generate
from tiny import tiny_model


def chat_prompts(tokenizer, texts):
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def hf_greedy(model, prompt, n):
    # The mask is explicit: with no mask, HF infers one from pad_token_id, and SmolLM2's pad token is
    # its EOS token <|im_end|>, which every chat prompt contains after each turn: the inferred mask would
    # hide those tokens inside the prompt.
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, eos_token_id=None,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_logprobs(model, context, tokens, temperature=1.0):
    """log p(tokens[t] | context + tokens[:t]) under softmax(logits / temperature), from a full forward."""
    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].float()
    if temperature:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def random_prompts(n, vocab, lo=3, hi=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


# --- the embedded model (realism) ---------------------------------------------------------------

def test_greedy_batch_equals_hf_generate_alone_embedded(embedded):
    model, tok = embedded
    prompts = chat_prompts(tok, ["Hi", "What is 17 * 3?",
                                 "Write a haiku about the sea and the wind in the trees.",
                                 "Using the numbers [44, 19, 35], create an equation that equals 98. "
                                 "Think step by step, then give the equation."])
    assert len({len(p) for p in prompts}) == 4
    gen = generate(model, prompts, max_new_tokens=48, temperature=0)
    for i, p in enumerate(prompts):
        assert gen.tokens[i] == hf_greedy(model, p, 48), f"prompt {i}"
        assert not gen.finished[i]


def test_logprobs_equal_teacher_forcing_embedded(embedded):
    model, tok = embedded
    prompts = chat_prompts(tok, ["Name a colour.", "Count from one to five, in words, slowly."])
    stop = [tok.eos_token_id]
    gen = generate(model, prompts, max_new_tokens=40, num_samples=2, temperature=0.8,
                   stop_token_ids=stop, generator=torch.Generator().manual_seed(1))
    for r, tokens in enumerate(gen.tokens):
        ref = teacher_forced_logprobs(model, prompts[r // 2], tokens, temperature=0.8)
        assert torch.allclose(torch.tensor(gen.logprobs[r]), ref, atol=1e-4), r


def test_stop_at_eos_when_pad_equals_eos_embedded(embedded):
    model, tok = embedded
    assert tok.pad_token_id == tok.eos_token_id  # the case of pitfall 2
    prompts = chat_prompts(tok, ["Say hello.", "Reply with one word: yes or no?", "Hi"])
    full = generate(model, prompts, max_new_tokens=60, temperature=0)
    cut = generate(model, prompts, max_new_tokens=60, temperature=0, stop_token_ids=[tok.eos_token_id])
    for r in range(len(prompts)):
        first = full.tokens[r].index(tok.eos_token_id)   # these short answers do end within 60 tokens
        assert cut.tokens[r] == full.tokens[r][:first + 1]
        assert cut.finished[r]


# --- tiny random models (fast; both attention variants) -----------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_mixed_lengths_equals_hf_tiny(arch):
    model = tiny_model(arch=arch)
    prompts = random_prompts(6, 256)
    gen = generate(model, prompts, max_new_tokens=24, temperature=0)
    for i, p in enumerate(prompts):
        assert gen.tokens[i] == hf_greedy(model, p, 24)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampled_logprobs_and_stops_tiny(arch):
    # vocab 16 makes stop tokens frequent, so rows end at different steps and the working batch is
    # compacted several times; each row must still match teacher forcing token for token.
    model = tiny_model(vocab_size=16, arch=arch, seed=3)
    prompts = random_prompts(5, 16, seed=1)
    stop = [4, 9]
    gen = generate(model, prompts, max_new_tokens=30, num_samples=4, temperature=1.0, stop_token_ids=stop,
                   generator=torch.Generator().manual_seed(0))
    assert len(gen.tokens) == 20
    assert any(gen.finished) and not all(len(t) == len(gen.tokens[0]) for t in gen.tokens)
    for r, tokens in enumerate(gen.tokens):
        stops_at = [i for i, t in enumerate(tokens) if t in stop]
        if gen.finished[r]:
            assert stops_at == [len(tokens) - 1]
        else:
            assert stops_at == [] and len(tokens) == 30
        ref = teacher_forced_logprobs(model, prompts[r // 4], tokens)
        assert torch.allclose(torch.tensor(gen.logprobs[r]), ref, atol=1e-4)


def test_seeded_and_first_token_drawn_per_row():
    model = tiny_model(vocab_size=64, seed=1)
    prompt = random_prompts(1, 64, seed=5)
    a = generate(model, prompt, max_new_tokens=12, num_samples=8, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, max_new_tokens=12, num_samples=8, generator=torch.Generator().manual_seed(7))
    c = generate(model, prompt, max_new_tokens=12, num_samples=8, generator=torch.Generator().manual_seed(8))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    # After the shared prefill each row draws its own first token: drawing it once before copying the
    # prefix's cache would give all num_samples rows the same first token.
    assert len({t[0] for t in a.tokens}) > 1
    assert len({tuple(t) for t in a.tokens}) == 8


def test_top_k_and_top_p_stay_in_the_allowed_set():
    model = tiny_model(vocab_size=32, seed=2)
    prompt = random_prompts(1, 32, seed=9)[0]
    for kwargs in (dict(top_k=3), dict(top_p=0.5)):
        gen = generate(model, [prompt], max_new_tokens=1, num_samples=200, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), **kwargs)
        with torch.no_grad():
            probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        order = probs.argsort(descending=True)
        if "top_k" in kwargs:
            allowed = set(order[:3].tolist())
        else:  # smallest prefix of the sorted distribution whose mass reaches top_p
            need = int((probs[order].cumsum(0) < 0.5).sum()) + 1
            allowed = set(order[:need].tolist())
        drawn = {t[0] for t in gen.tokens}
        assert drawn <= allowed and len(drawn) > 1
        # Reported log-probs are of the untruncated distribution.
        for t, lp in zip(gen.tokens, gen.logprobs):
            assert abs(lp[0] - probs[t[0]].log().item()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_continue_from_cache_equals_fresh_run(arch):
    """RRR's pattern: sample G continuations of a shared prefix, then append a chunk to each row and
    sample again. The second stage must equal a fresh greedy run over the whole concatenated text."""
    model = tiny_model(vocab_size=16, arch=arch, seed=4)
    prompts = random_prompts(3, 16, seed=2)
    first = generate(model, prompts, max_new_tokens=10, num_samples=3, temperature=1.0, stop_token_ids=[5],
                     generator=torch.Generator().manual_seed(3), keep_cache=True)
    assert any(first.finished) and not all(first.finished)   # both kinds of rows get continued
    chunks = random_prompts(9, 16, lo=1, hi=6, seed=6)
    second = generate(model, chunks, max_new_tokens=8, temperature=0, cache=first.cache, keep_cache=True)
    third = generate(model, [[7]] * 9, max_new_tokens=5, temperature=0, cache=second.cache)
    for r in range(9):
        context = prompts[r // 3] + first.tokens[r] + chunks[r]
        assert second.tokens[r] == hf_greedy(model, context, 8)
        ref = teacher_forced_logprobs(model, context, second.tokens[r], temperature=0)
        assert torch.allclose(torch.tensor(second.logprobs[r]), ref, atol=1e-4)
        assert third.tokens[r] == hf_greedy(model, context + second.tokens[r] + [7], 5)


def test_continue_with_num_samples_shares_each_row():
    model = tiny_model(vocab_size=32, seed=5)
    prompts = random_prompts(2, 32, seed=3)
    first = generate(model, prompts, max_new_tokens=4, temperature=0, keep_cache=True)
    second = generate(model, [[3, 4], [5]], max_new_tokens=6, num_samples=3, temperature=1.0,
                      generator=torch.Generator().manual_seed(0), cache=first.cache)
    assert len(second.tokens) == 6   # rows are prompt-major: row i*3+j continues first-stage row i
    assert len({tuple(t) for t in second.tokens[:3]}) > 1
    for r in range(6):
        context = prompts[r // 3] + first.tokens[r // 3] + [[3, 4], [5]][r // 3]
        ref = teacher_forced_logprobs(model, context, second.tokens[r])
        assert torch.allclose(torch.tensor(second.logprobs[r]), ref, atol=1e-4)


def test_updated_weights_are_used():
    """Nothing the sampler prepares outlives a call: an in-place update between calls is seen."""
    model = tiny_model(vocab_size=32, seed=6)
    prompt = random_prompts(1, 32, seed=4)
    before = generate(model, prompt, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert after.tokens[0] == hf_greedy(model, prompt[0], 8)
    assert before.tokens != after.tokens


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError):
        generate(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate(model, [[1, 2]], max_new_tokens=4, top_p=0)
    first = generate(model, [[1, 2]], max_new_tokens=2, keep_cache=True)
    with pytest.raises(ValueError):
        generate(model, [[1], [2]], max_new_tokens=2, cache=first.cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_are_views_and_change_nothing(arch):
    """fuse_projections lays q/k/v and gate/up back to back so that decoding multiplies by them as one
    matrix with no fused copy beside the weights; the module and the samples stay the same."""
    from sampler import _prepare, fuse_projections

    model = tiny_model(arch=arch, seed=5)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4]]
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        logits = model(ids).logits
    before = generate(model, prompts, max_new_tokens=10, temperature=0)
    unfused = _prepare(model, 8, model.lm_head.weight).layers[0]
    assert unfused["qkv"][0].untyped_storage()._cdata != model.model.layers[0].self_attn.q_proj.weight.untyped_storage()._cdata
    fuse_projections(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert generate(model, prompts, max_new_tokens=10, temperature=0).tokens == before.tokens
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    prepared = _prepare(model, 8, model.lm_head.weight).layers[0]
    assert prepared["qkv"][0].untyped_storage()._cdata == attn.q_proj.weight.untyped_storage()._cdata
    assert prepared["gate_up"][0].untyped_storage()._cdata == mlp.up_proj.weight.untyped_storage()._cdata
    assert torch.equal(prepared["qkv"][0], torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    fuse_projections(model)      # again: what is laid out already is left as it is, not copied
    assert attn.q_proj.weight.untyped_storage()._cdata == prepared["qkv"][0].untyped_storage()._cdata


# --- host syncs: the decode loop waits for the device only once per CHECK_EVERY steps --------------

def test_the_counter_sees_each_kind_of_host_sync():
    from bench.op_counts import count_ops

    t = torch.tensor([0.0, 1.0, 2.0])
    with count_ops() as c:
        int(t.sum())
        if t.any():
            pass
        t[t > 0]
        t.nonzero()
        t.tolist()
        (t * 2).add_(1)[1:]
    assert (c.syncs, c.compute, c.views) == (5, 5, 1)


@pytest.mark.parametrize("stops", [[], [4, 9]])
def test_decoding_syncs_the_host_once_per_check(stops):
    """At most one host sync per CHECK_EVERY decode steps plus a constant (the results: tokens,
    log-probs, finished flags; a continuation also reads the kept cache's lengths and last
    tokens), whether rows stop at different steps and the working batch is compacted or not."""
    from bench.op_counts import count_ops
    from sampler import CHECK_EVERY

    assert CHECK_EVERY >= 4
    model = tiny_model(vocab_size=16, seed=3)
    prompts = random_prompts(5, 16, seed=1)
    syncs = {}
    for new in (16, 48):
        with count_ops() as first:
            gen = generate(model, prompts, max_new_tokens=new, num_samples=4, stop_token_ids=stops,
                           generator=torch.Generator().manual_seed(0), keep_cache=True)
        with count_ops() as second:
            generate(model, [[3]] * 20, max_new_tokens=new, stop_token_ids=stops, cache=gen.cache,
                     generator=torch.Generator().manual_seed(1))
        syncs[new] = first.syncs
        assert first.syncs <= (new - 1) // CHECK_EVERY + 4, new
        assert second.syncs <= (new - 1) // CHECK_EVERY + 6, new
    if stops:   # rows ended at different steps, so the working batch shrank
        lengths = {len(t) for t in gen.tokens}
        assert any(gen.finished) and len(lengths) > 3
    else:       # one sync per check, however long the call
        assert syncs[48] - syncs[16] == 47 // CHECK_EVERY - 15 // CHECK_EVERY


def test_a_decoder_that_softcaps_its_logits_is_refused():
    """The sampler computes plain Llama-family logits and attention; a model whose config asks for Gemma-2's
    softcapping would be sampled (and trained) from the wrong distribution, so it is refused in one line."""
    model = tiny_model()
    generate(model, [[5, 6]], max_new_tokens=2, temperature=0)        # the plain model samples
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcaps logits"):
        generate(model, [[5, 6]], max_new_tokens=2, temperature=0)
