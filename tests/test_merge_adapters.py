"""bench/merge_adapters.py: adapters kept in fp16 by bench/learning.py, merged into their base model, give the
log-probs of the model with the adapters applied as LoRA layers (a second computation: x A^T B^T beside
the base layer, not W + s B A)."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny import REPO, save_tiny_chat_model

sys.path.insert(0, str(REPO))
from bench import learning, merge_adapters  # noqa: E402
from model import add_lora  # noqa: E402
from runs import LORA_LINEAR  # noqa: E402


def test_merged_model_matches_the_adapters_applied_as_lora_layers(tmp_path):
    from transformers import AutoModelForCausalLM
    base = save_tiny_chat_model(tmp_path / "countdown_easy-800-0123456789")
    lora = AutoModelForCausalLM.from_pretrained(base).eval()
    add_lora(lora, 4, 8.0, seed=0, targets=LORA_LINEAR)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_b"):         # trained adapters: B is no longer zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    run = tmp_path / "run"
    run.mkdir()
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if n.endswith(("lora_a", "lora_b"))}
    save_file(adapters, run / "adapters.safetensors",
              metadata={"r": "4", "alpha": "8.0", "targets": json.dumps(list(LORA_LINEAR))})
    (run / "config.json").write_text(json.dumps(dict(warm_start_model=dict(folder=base.name))))
    kept = tmp_path / "kept.safetensors"
    learning.keep_adapters(run / "adapters.safetensors", kept)
    merge_adapters.main([str(kept), "--base", str(base), "--out", str(tmp_path / "merged")])

    with torch.no_grad():       # the reference: the LoRA layers with the kept (fp16-rounded) adapters
        for name, p in lora.named_parameters():
            if name in adapters:
                p.copy_(p.half().float())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        want, got = lora(ids).logits.log_softmax(-1), merged(ids).logits.log_softmax(-1)
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits.log_softmax(-1)
    assert (want - plain).abs().max() > 1e-2          # the adapters change the model ...
    assert torch.allclose(got, want, atol=1e-4)      # ... and the merged model is that change

    # Another base (another warm start's folder name) and an existing --out are refused before any work.
    other = save_tiny_chat_model(tmp_path / "countdown_easy-800-ffffffffff")
    with pytest.raises(SystemExit, match="trained on the warm start countdown_easy-800-0123456789"):
        merge_adapters.main([str(kept), "--base", str(other), "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit):
        merge_adapters.main([str(kept), "--base", str(base), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "m2").exists()
