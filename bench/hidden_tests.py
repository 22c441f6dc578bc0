"""How often do programs sampled from a model that pass MBPP's own tests fail its hidden tests?

Running time with the defaults: about 34 minutes on a 2-core AMD EPYC CPU (A in BENCHMARKS.md), fp32,
measured while other jobs shared its cores.

    python bench/hidden_tests.py                        # embedded SmolLM2-135M, 100 MBPP train problems x 8 samples
    python bench/hidden_tests.py --model Qwen/Qwen2.5-1.5B-Instruct --problems 374 --samples 4

Samples --samples programs per problem at temperature 1 (the reward path's sampler, sampler.generate), checks
each through the task's reward (get_task("mbpp").check_batch: visible tests, then the hidden ones of
data/mbpp_hidden.py) and prints: programs passing the visible tests, how many of them fail hidden tests, and
the problems where that happens. Writes the per-program results to --out (JSON).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench._cli import Help  # noqa: E402
from data import get_task  # noqa: E402


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--model", default=None,
                    help="Hugging Face folder or hub id; None: the embedded SmolLM2-135M-Instruct")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--data-dir", default=os.environ.get("RRR_DATA_DIR", str(shared)),
                    help="folder holding mbpp/mbpp.jsonl: $RRR_DATA_DIR if set, else ../shared/data "
                         "beside the repository")
    ap.add_argument("--problems", type=int, default=100, help="MBPP train problems (the first of the seeded order)")
    ap.add_argument("--samples", type=int, default=8, help="programs sampled per problem (temperature 1)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per program")
    ap.add_argument("--batch", type=int, default=32, help="rows per sampling call")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", type=Path, default=Path("bench/hidden-tests.json"), help="per-program results (JSON)")
    return ap


def main():
    args = parser().parse_args()
    if not (Path(args.data_dir) / "mbpp" / "mbpp.jsonl").is_file():
        sys.exit(f"error: {Path(args.data_dir) / 'mbpp' / 'mbpp.jsonl'} not found (pass --data-dir)")
    if min(args.problems, args.samples, args.max_new_tokens, args.batch) < 1:
        sys.exit("error: --problems, --samples, --max-new-tokens and --batch must be at least 1")

    import torch
    from tqdm import tqdm

    from model import chat_ids, load_model, stop_token_ids
    from sampler import generate
    task = get_task("mbpp")
    examples = task.load("train", data_dir=args.data_dir, size=args.problems, seed=0)
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    stops, gen = stop_token_ids(tok, model), torch.Generator().manual_seed(args.seed)
    per_call = max(1, args.batch // args.samples)
    results, started = [], time.time()
    for start in tqdm(range(0, len(examples), per_call), desc="sample and check"):
        part = examples[start:start + per_call]
        out = generate(model, [chat_ids(tok, ex.messages) for ex in part], max_new_tokens=args.max_new_tokens,
                       num_samples=args.samples, temperature=1.0, stop_token_ids=stops, generator=gen)
        texts = [tok.decode(t, skip_special_tokens=True) for t in out.tokens]
        repeated = [ex for ex in part for _ in range(args.samples)]
        for ex, text, v in zip(repeated, texts, task.check_batch(texts, repeated)):
            results.append(dict(id=ex.id, hidden=len(ex.reference["hidden"]), base=bool(v.base), plus=v.ok,
                                feedback=v.feedback, program=text))
    base = [r for r in results if r["base"]]
    caught = [r for r in base if not r["plus"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(settings=vars(args) | dict(out=str(args.out)), results=results), indent=1))
    print(f"{len(results)} programs ({len(examples)} problems x {args.samples}), {(time.time() - started) / 60:.1f} min")
    print(f"pass MBPP's own tests: {len(base)} ({len({r['id'] for r in base})} problems)")
    print(f"of those, fail hidden tests: {len(caught)} ({len({r['id'] for r in caught})} problems: "
          f"{', '.join(sorted({r['id'] for r in caught})) or 'none'})")
    print(f"pass visible and hidden tests: {sum(r['plus'] for r in results)}; written: {args.out}")


if __name__ == "__main__":
    main()
