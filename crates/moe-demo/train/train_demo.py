#!/usr/bin/env python3
"""Trains the demo model that `moe serve --demo` serves, and its three tenant adapters.

A byte-level Mixtral-layout MoE (hidden 128, 4 layers, 8 experts top-2, ~3.4M parameters, saved
as bf16) trained on CPU from text every CPython install ships: prose from `pydoc_data.topics` and
code from a fixed list of standard-library modules. Nothing is downloaded. Then, from the frozen
base, with current PEFT (`target_parameters`, as users train them today):

  prose  a gate-only LoRA (`mlp.gate.weight`) trained on the prose half
  code   a gate-only LoRA trained on the code half
  attn   an attention LoRA (q_proj, v_proj) trained on the code half

Each lowers its own domain's held-out loss; the two gate adapters route the same text to
different experts. So that there are domain experts for a gate adapter to find, the base is
trained with a routing hint on half of its rows (as in domain-expert MoEs such as DEMix/BTX):
+HINT on the router logits of experts 0-3 for prose rows and 4-7 for code rows. The served model
has no hint; a tenant's gate LoRA learns to route its domain's tokens to its experts. `report.json` records what was measured (losses with and without each adapter,
per-layer expert histograms, their total variation distance), and `heldout.json` a sample of the
held-out text the Rust tests measure on.

Usage (about 12 minutes on two cores; fixed seeds, so a rerun reproduces the losses):
    python3 crates/moe-demo/train/train_demo.py [--out crates/moe-demo/trained] [--check]
`--check` trains into a temporary directory and compares its losses with the committed report.
"""

import argparse
import json
import math
import os
import sys
import sysconfig
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral import modeling_mixtral

SEED = 1234
BOS, EOS, VOCAB = 256, 257, 258
SEQ, BATCH = 256, 16
BASE_STEPS, ADAPTER_STEPS = 1300, 200
HELDOUT_FRACTION = 0.05
HINT = 2.0
# The routing hint of the rows of the current base-training batch ((rows * SEQ, experts) or None).
ROUTING_HINT = {"bias": None}


def router_forward(self, hidden_states):
    """transformers 5's MixtralTopKRouter.forward, plus the training-time routing hint."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states, self.weight)
    if ROUTING_HINT["bias"] is not None:
        router_logits = router_logits + ROUTING_HINT["bias"]
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    return router_logits, router_top_value, router_indices


modeling_mixtral.MixtralTopKRouter.forward = router_forward
CODE_MODULES = [
    "textwrap.py", "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "calendar.py",
    "difflib.py", "argparse.py", "dataclasses.py", "functools.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "csv.py",
]


def corpus():
    """(prose, code) as bytes: pydoc's topic texts, and the listed stdlib modules' source."""
    import pydoc_data.topics

    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    lib = sysconfig.get_paths()["stdlib"]
    code = "\n\n".join(open(os.path.join(lib, m), encoding="utf-8").read() for m in CODE_MODULES)
    return prose.encode("utf-8"), code.encode("utf-8")


def split(data):
    cut = int(len(data) * (1 - HELDOUT_FRACTION))
    return torch.tensor(list(data[:cut]), dtype=torch.long), torch.tensor(list(data[cut:]), dtype=torch.long)


def batch(gen, *sources):
    """BATCH windows of SEQ bytes, drawn evenly from the given sources, and each row's source."""
    rows, which = [], []
    for i in range(BATCH):
        src = sources[i % len(sources)]
        start = int(torch.randint(0, len(src) - SEQ - 1, (1,), generator=gen))
        rows.append(src[start : start + SEQ + 1])
        which.append(i % len(sources))
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:], which


def routing_hint(which, gen, num_experts=8):
    """The hint for half of the rows (drawn): +HINT on experts 0-3 (source 0, prose) or 4-7."""
    bias = torch.zeros(len(which), SEQ, num_experts)
    half = num_experts // 2
    for r, src in enumerate(which):
        if float(torch.rand((1,), generator=gen)) < 0.5:
            bias[r, :, src * half : (src + 1) * half] = HINT
    return bias.reshape(-1, num_experts)


def heldout_windows(data, n=24):
    """n evenly spaced windows of SEQ bytes (the same ones every run)."""
    step = (len(data) - SEQ - 1) // n
    return [data[i * step : i * step + SEQ + 1] for i in range(n)]


@torch.no_grad()
def evaluate(model, windows, num_layers, num_experts, top_k):
    """Mean next-byte cross-entropy (nats) and the per-layer expert histogram (fractions)."""
    model.eval()
    x = torch.stack(windows)
    out = model(input_ids=x[:, :-1], output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    hist = []
    for layer in range(num_layers):
        logits = out.router_logits[layer].reshape(-1, num_experts)
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=num_experts).float()
        hist.append((counts / counts.sum()).tolist())
    model.train()
    return ce.item(), hist


def tvd(a, b):
    return max(0.5 * sum(abs(x - y) for x, y in zip(la, lb)) for la, lb in zip(a, b))


def lr_at(step, total, peak, warmup=50):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(model, params, steps, peak_lr, gen, sources, label):
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0 if label != "base" else 0.05)
    model.train()
    t0, loss_sum = time.time(), 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        x, y, which = batch(gen, *sources)
        ROUTING_HINT["bias"] = routing_hint(which, gen) if label == "base" else None
        out = model(input_ids=x, output_router_logits=True)
        ROUTING_HINT["bias"] = None
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1))
        loss = ce + (0.01 * out.aux_loss if label == "base" else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += ce.item()
        if (step + 1) % 100 == 0:
            print(f"{label} step {step + 1}/{steps} loss {loss_sum / 100:.3f} ({time.time() - t0:.0f} s)", flush=True)
            loss_sum = 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "trained"))
    ap.add_argument("--check", action="store_true", help="train to a temp dir and compare with the committed report")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="moe-demo-check-") if args.check else args.out
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    prose, code = corpus()
    (prose_train, prose_held), (code_train, code_held) = split(prose), split(code)
    held = {"prose": heldout_windows(prose_held), "code": heldout_windows(code_held)}
    mixed = held["prose"][::2] + held["code"][::2]

    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, router_aux_loss_coef=0.01,
    )
    dims = (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    base = MixtralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(SEED)
    train(base, list(base.parameters()), BASE_STEPS, 3e-3, gen, (prose_train, code_train), "base")
    # The model is served in bf16: every measurement below is of the bf16 weights.
    base = base.to(torch.bfloat16).to(torch.float32)
    base.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    os.remove(os.path.join(out, "generation_config.json"))
    base = base.to(torch.float32)

    report = {"seed": SEED, "base_steps": BASE_STEPS, "adapter_steps": ADAPTER_STEPS, "heldout": {}, "hist": {}}
    for dom in ("prose", "code"):
        report["heldout"].setdefault("base", {})[dom] = evaluate(base, held[dom], *dims)[0]
    report["hist"]["base"] = evaluate(base, mixed, *dims)[1]

    adapters = {
        "prose": (dict(target_modules=[], target_parameters=["mlp.gate.weight"]), (prose_train,), 2e-2),
        "code": (dict(target_modules=[], target_parameters=["mlp.gate.weight"]), (code_train,), 2e-2),
        "attn": (dict(target_modules=["q_proj", "v_proj"]), (code_train,), 3e-3),
    }
    for i, (name, (targets, sources, lr)) in enumerate(adapters.items()):
        torch.manual_seed(SEED + 1 + i)
        gen = torch.Generator().manual_seed(SEED + 1 + i)
        pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **targets))
        train(pm, [p for p in pm.parameters() if p.requires_grad], ADAPTER_STEPS, lr, gen, sources, name)
        for dom in ("prose", "code"):
            report["heldout"].setdefault(name, {})[dom] = evaluate(pm, held[dom], *dims)[0]
        report["hist"][name] = evaluate(pm, mixed, *dims)[1]
        pm.save_pretrained(os.path.join(out, "adapters", name))
        os.remove(os.path.join(out, "adapters", name, "README.md"))  # PEFT's empty model card
        base = pm.unload()  # the base weights, without this adapter's layers
    report["tvd_prose_code"] = tvd(report["hist"]["prose"], report["hist"]["code"])
    print(json.dumps(report["heldout"], indent=1), "\nTVD prose vs code:", report["tvd_prose_code"])

    if args.check:
        committed = json.load(open(os.path.join(args.out, "report.json")))
        worst = 0.0
        for name, doms in committed["heldout"].items():
            for dom, want in doms.items():
                got = report["heldout"][name][dom]
                worst = max(worst, abs(got - want) / want)
                print(f"{name:6} {dom:5} committed {want:.4f} now {got:.4f}")
        print(f"largest relative difference {worst:.2%} (must be under 5%)")
        sys.exit(0 if worst < 0.05 else 1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    sample = {dom: [bytes(w.tolist()).decode("utf-8", "replace") for w in held[dom][:8]] for dom in held}
    with open(os.path.join(out, "heldout.json"), "w") as f:
        json.dump(sample, f, indent=1)


if __name__ == "__main__":
    main()
