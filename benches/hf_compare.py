#!/usr/bin/env python3
"""Measures Hugging Face transformers (PyTorch, CPU, f32) on the same checkpoint `moe bench`
uses, with the same thread count, so the README can state moe's figures as ratios.

    pip install torch transformers
    cargo run --release -- bench --json > /tmp/moe.json      # writes the bench model once
    python3 benches/hf_compare.py --model /tmp/moe-bench-model-v0.1.0 --threads 2 [--moe-json /tmp/moe.json]

Reports prefill tokens/s (one 512-token prompt), and decode tokens/s at batch 1 and 16
(16-token prompts, greedy, end-of-sequence ignored; tokens after the first over the time after
the first), like `moe bench`. With --moe-json it prints moe's embedded figures and the ratios; with
--report DIR (a `moe bench --report DIR` directory) it leaves peers.json there, which
`moe bench --from-json DIR/report.json --report DIR` draws beside moe's figures.
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def prompt(n, seed, vocab):
    return [(seed * 7919 + i * 104729) % vocab for i in range(n)]


def prefill(model, vocab, n=512):
    ids = torch.tensor([prompt(n, 1, vocab)])
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t = time.perf_counter()
        model(ids)
        return n / (time.perf_counter() - t)


def decode(model, vocab, batch, new_tokens):
    ids = torch.tensor([prompt(16, i + 2, vocab) for i in range(batch)])
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t1
    return batch * (new_tokens - 1) / max(total - first, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--moe-json")
    ap.add_argument("--report", help="a `moe bench --report` directory: writes peers.json there, "
                    "and `moe bench --from-json DIR/report.json --report DIR` draws transformers beside moe")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    hf = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "threads": a.threads,
        "prefill_512_tokens_per_s": prefill(model, vocab),
        "decode_batch1_tokens_per_s": decode(model, vocab, 1, a.new_tokens * 2),
        "decode_batch16_tokens_per_s": decode(model, vocab, 16, a.new_tokens),
    }
    out = {"hf": hf}
    if a.moe_json:
        moe = json.load(open(a.moe_json))
        emb = moe["topologies"][0]
        dec = {d["batch"]: d["tokens_per_s"] for d in emb["decode"]}
        out["moe_embedded"] = {"prefill": emb["prefill"]["tokens_per_s"], "decode_batch1": dec[1], "decode_batch16": dec[16]}
        out["ratios"] = {
            "prefill": emb["prefill"]["tokens_per_s"] / hf["prefill_512_tokens_per_s"],
            "decode_batch1": dec[1] / hf["decode_batch1_tokens_per_s"],
            "decode_batch16": dec[16] / hf["decode_batch16_tokens_per_s"],
        }
    if a.report:
        import os
        peer = {"name": f"transformers {hf['transformers']} (PyTorch, f32)",
                "prefill_tokens_per_s": hf["prefill_512_tokens_per_s"],
                "decode": [{"batch": 1, "tokens_per_s": hf["decode_batch1_tokens_per_s"]},
                           {"batch": 16, "tokens_per_s": hf["decode_batch16_tokens_per_s"]}]}
        os.makedirs(a.report, exist_ok=True)
        with open(os.path.join(a.report, "peers.json"), "w") as f:
            json.dump({"peers": [peer]}, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
