"""LoRA adapters kept by bench/learning.py (or written by rrr.py --use-peft) merged into their base model, as
a Hugging Face folder that rrr.py's --model, transformers' from_pretrained or any other scorer loads:

    python warmstart.py --task countdown_easy --puzzles 800 --reflections --no-bf16   # prints the base's folder
    python bench/merge_adapters.py bench/results/learning/adapters/seed-0-rrr.safetensors \\
        --base ~/.cache/rrr/warm-start/countdown_easy-800-2d4ca02264 --out runs/merged/seed-0-rrr

The adapters file's header holds the rank, alpha and adapted layers (and, in the files bench/learning.py
keeps, the warm start's folder name, which names a hash of every setting that built it: a --base with
another name is refused). Each adapted weight becomes W + (alpha / r) B A, summed in fp32 (model.merge_lora,
as rrr.py's own export). Takes a few seconds on a CPU for the 135M model.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._cli import Help  # noqa: E402


def merge(adapters: Path, base: Path, out: Path):
    """The base model with the adapters merged, written to `out` (weights, config, tokenizer)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import add_lora, merge_lora
    with safe_open(str(adapters), "pt") as f:
        header = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        weights = {k: f.get_tensor(k).float() for k in f.keys()}
    if not {"r", "alpha", "targets"} <= header.keys():
        raise SystemExit(f"{adapters}: no LoRA header (r, alpha, targets): not an adapters file rrr.py wrote")
    expected = header.get("warm_start_model")
    if expected and expected != base.resolve().name:
        raise SystemExit(f"--base {base}: these adapters were trained on the warm start {expected}, not "
                         f"{base.resolve().name}")
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = add_lora(copy.deepcopy(plain), header["r"], header["alpha"], seed=0, targets=header["targets"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(k.endswith((".lora_a", ".lora_b")) for k in missing):
        raise SystemExit(f"{adapters}: its tensors do not fit {base} (unexpected: {unexpected[:3]})")
    plain.load_state_dict(merge_lora(model.state_dict(), model))
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("adapters", type=Path, help="the adapters' safetensors file")
    ap.add_argument("--base", type=Path, required=True,
                    help="the model they were trained on (a Hugging Face folder: for bench/learning.py's, the "
                         "warm start's folder that warmstart.py prints)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the merged model (must not exist)")
    args = ap.parse_args(argv)
    for path, what in ((args.adapters, "file"), (args.base / "config.json", "model folder")):
        if not path.is_file():
            ap.error(f"{path.parent if what == 'model folder' else path}: no such {what}")
    if args.out.exists():
        ap.error(f"--out {args.out} exists: choose a new folder")
    merge(args.adapters, args.base, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
