"""An RRR conversation as token ids, and its sampling: the prompt, a failed try, the reflection prompt,
a reflection, the retry prompt and a retry, each turn built by the tokenizer's own chat template.
`reflect_and_retry` samples G reflections per failed try from one shared prefill, then a retry after each,
continuing the reflection's KV cache; `judged_retries` adds the task's verdicts. rrr.py's rollout and
evaluation both use them; the reflection turn's text is `reflection_text`."""

import functools
from dataclasses import dataclass

from model import next_turn_ids
from policy import sample, stop_of

GENERIC_REFLECTION = ("I made a mistake in my previous answer. I will read the task again carefully, "
                      "check every step, and then give a corrected answer.")


@functools.lru_cache(maxsize=256)
def turn(tokenizer, text: str, ended_with: int | None) -> tuple[int, ...]:
    """A user turn saying `text` after a sampled turn that ended with `ended_with` (model.next_turn_ids),
    cached: the same prompts follow every try."""
    return tuple(next_turn_ids(tokenizer, text, ended_with))


def generic_turn(cfg, pol) -> list[int]:
    """The fixed generic reflection as a finished assistant turn, then the retry-prompt turn."""
    tok = pol.tokenizer
    return (list(tok(GENERIC_REFLECTION, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
            + list(turn(tok, cfg.retry_prompt, tok.eos_token_id)))


def reflection_text(cfg, feedback: str) -> str:
    """The reflection prompt's turn: --reflection-prompt (the task's by default) and, with
    --reflection-feedback, the verifier's feedback on the failed try (Verdict.feedback_to_show: for MBPP
    the visible tests' results; hidden tests are never described)."""
    if cfg.reflection_feedback:
        return f"{cfg.reflection_prompt}\n\nFeedback on that answer: {feedback}"
    return cfg.reflection_prompt


def reflection_prefix(cfg, pol, context, attempt, stop, feedback):
    """context + the failed try + the reflection-prompt turn: what a reflection is sampled after."""
    return list(context) + list(attempt) + list(turn(pol.tokenizer, reflection_text(cfg, feedback), stop))


def reflect_and_retry(cfg, pol, prefixes, num_samples, temperature, gen):
    """prefixes: a conversation up to a failed try + the reflection-prompt turn (reflection_prefix). Samples
    num_samples reflections per prefix (prefilled once, shared), then one retry after each, continuing the
    reflection's cache. Returns (reflections, retries, the context each retry was sampled after: prefix +
    reflection + retry-prompt turn); reflections is None with --reflection generic."""
    def draw(prompts, **kw):
        return sample(pol.sampler, pol.stops, prompts, cfg, temperature=temperature, generator=gen, **kw)

    if cfg.reflection == "generic":
        contexts = [p + generic_turn(cfg, pol) for p in prefixes]
        retries = draw(contexts, num_samples=num_samples)
        return None, retries, [contexts[r // num_samples] for r in range(len(retries.tokens))]
    refl = draw(prefixes, max_new_tokens=cfg.max_reflection_length, num_samples=num_samples, keep_cache=True)
    chunks = [list(turn(pol.tokenizer, cfg.retry_prompt, stop_of(t, f)))
              for t, f in zip(refl.tokens, refl.finished)]
    retries = draw(chunks, cache=refl.cache)
    refl.cache = None        # consumed by the retry, which grew it in place: free it now
    contexts = [prefixes[r // num_samples] + list(refl.tokens[r]) + chunks[r] for r in range(len(chunks))]
    return refl, retries, contexts


def next_reflection_prefix(cfg, pol, context, retry, finished, verdict):
    """A conversation up to a failed try (the first, or a retry), ready for the reflection on it."""
    return reflection_prefix(cfg, pol, context, retry, stop_of(retry, finished), verdict.feedback_to_show())


@dataclass
class Retries:
    """One round of reflections and retries, judged: what a further round (--attempts > 2) continues."""
    reflections: object        # the sampled reflections (sampler.Generation; None with --reflection generic)
    retries: object            # the sampled retries (sampler.Generation)
    contexts: list             # what each retry was sampled after
    texts: list[str]           # the retries, decoded
    verdicts: list             # the task's verdict on each retry


def judged_retries(cfg, pol, task, prefixes, examples, num_samples=1, temperature=0.0, gen=None) -> Retries:
    """reflect_and_retry (greedy by default), then the task's verdict on each retry (examples: one per
    retry)."""
    refl, retries, contexts = reflect_and_retry(cfg, pol, prefixes, num_samples, temperature, gen)
    texts = [pol.decode(t) for t in retries.tokens]
    return Retries(refl, retries, contexts, texts, task.check_batch(texts, examples))


def judged_failures(verdicts) -> list[int]:
    """The places of the tries that were judged and failed: those a reflection follows."""
    return [j for j, v in enumerate(verdicts) if not v.ok and not v.infra]


def next_prefixes(cfg, pol, retried: Retries, going: list[int]) -> list:
    """The conversations of the retries at `going`, each up to its failed retry, ready for a reflection."""
    return [next_reflection_prefix(cfg, pol, retried.contexts[j], retried.retries.tokens[j],
                                   retried.retries.finished[j], retried.verdicts[j]) for j in going]
