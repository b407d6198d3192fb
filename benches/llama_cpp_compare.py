#!/usr/bin/env python3
"""Our CPU engine against llama.cpp on the benchmark checkpoint, interleaved, medians of rounds.

What it does, each step skipped when its output already exists under --work:
  1. Builds llama.cpp from source: the llama-cpp-python source distribution on the Python
     package index vendors it under vendor/llama.cpp; `cmake` and `ninja` come from pip;
     `llama-bench` and `llama-batched-bench` are built statically (-DBUILD_SHARED_LIBS=OFF) for
     this machine (-DGGML_NATIVE=ON, so it uses every instruction set the CPU has).
  2. Converts the benchmark checkpoint (the one `moe bench` writes) with llama.cpp's own
     convert_hf_to_gguf.py to f32 and bf16 GGUF. The checkpoint has no SentencePiece model, which
     the converter wants for a Mixtral: one is written with the checkpoint's 32,000 pieces (three
     controls, 256 bytes, the rest plain pieces) straight from sentencepiece's protobuf.
  3. Runs both engines in turn, --rounds times (default 3): `moe bench --core --json` (prefill of
     512 tokens, decode at batch 1, 16 and 64 with 16-token prompts and 32/64 new tokens, and decode
     at batch 1 with bf16 weights), then llama-bench (pp512, tg64) on the f32 and bf16 files and
     llama-batched-bench (16-token prompts, 32 new tokens, 16 and 64 sequences), with the same
     thread count. llama.cpp keeps its default f16 KV cache.
  4. Prints the medians and the ratios moe / llama.cpp, and writes them to --out (JSON).

Needs network only for step 1 (PyPI); later runs reuse the build.

    python3 benches/llama_cpp_compare.py --moe target/release/moe [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

PYPI = "https://pypi.org/pypi/llama-cpp-python/json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def fetch_sdist(work: Path, version: str | None) -> Path:
    """Downloads and unpacks the llama-cpp-python sdist; returns its vendor/llama.cpp."""
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found and version is None:
        return found[-1]
    url = PYPI if version is None else f"https://pypi.org/pypi/llama-cpp-python/{version}/json"
    meta = json.load(urllib.request.urlopen(url, timeout=60))
    sdist = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
    link = urllib.parse.urljoin(url, sdist["url"])
    tarball = work / sdist["filename"]
    if not tarball.exists():
        log(f"downloading {link}")
        urllib.request.urlretrieve(link, tarball)
    with tarfile.open(tarball) as t:
        t.extractall(work, filter="data")
    return work / tarball.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"


def build(src: Path) -> Path:
    bin_dir = src / "build" / "bin"
    if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-batched-bench").exists():
        return bin_dir
    try:
        import cmake  # noqa: F401
        import ninja  # noqa: F401
    except ImportError:
        run([sys.executable, "-m", "pip", "install", "cmake", "ninja"])
    run(["cmake", "-S", str(src), "-B", str(src / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", str(src / "build"), "-j", str(os.cpu_count() or 2),
         "--target", "llama-bench", "llama-batched-bench"])
    return bin_dir


def write_sentencepiece(path: Path, vocab: int) -> None:
    """A SentencePiece model with `vocab` pieces: <unk>, <s>, </s>, 256 byte pieces, then plain ones."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    m = spm.ModelProto()
    t = spm.ModelProto.SentencePiece
    for piece, kind in (("<unk>", t.UNKNOWN), ("<s>", t.CONTROL), ("</s>", t.CONTROL)):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=t.BYTE)
    for i in range(vocab - len(m.pieces)):
        m.pieces.add(piece=f"\u2581p{i}", score=-float(i), type=t.NORMAL)
    m.trainer_spec.model_type = spm.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    path.write_bytes(m.SerializeToString())


def convert(src: Path, checkpoint: Path, work: Path) -> dict[str, Path]:
    """GGUF files (f32 and bf16) of `checkpoint`, made by llama.cpp's converter."""
    out = {"f32": work / "bench-f32.gguf", "bf16": work / "bench-bf16.gguf"}
    if all(p.exists() for p in out.values()):
        return out
    hf = work / "hf"
    hf.mkdir(exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    # The converter reads the older key names.
    config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if config.get("head_dim") is None:
        config.pop("head_dim", None)
    config["torch_dtype"] = config.get("dtype", "float32")
    (hf / "config.json").write_text(json.dumps(config, indent=1))
    link = hf / "model.safetensors"
    if not link.exists():
        link.symlink_to((checkpoint / "model.safetensors").resolve())
    write_sentencepiece(hf / "tokenizer.model", config["vocab_size"])
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    for kind, path in out.items():
        if not path.exists():
            run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", kind,
                 "--outfile", str(path)], env=env, stdout=subprocess.DEVNULL)
    return out


def llama_bench(bin_dir: Path, model: Path, threads: int, prompt: int, gen: int) -> float:
    """Tokens/s of one llama-bench test (pp`prompt` or tg`gen`)."""
    p = run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt),
             "-n", str(gen), "-r", "3", "-o", "json"], capture_output=True, text=True)
    rows = json.loads(p.stdout)
    return float(rows[0]["avg_ts"])


def batched_bench(bin_dir: Path, model: Path, threads: int, batches: list[int]) -> dict[int, float]:
    """Generation tokens/s of llama-batched-bench with 16-token prompts and 32 new tokens."""
    ctx = max(batches) * 48 + 64
    p = run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-tb", str(threads),
             "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", "16", "-ntg", "32",
             "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"],
            capture_output=True, text=True)
    out = {}
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            out[int(row["pl"])] = float(row["speed_tg"])
    return out


def moe_core(moe: str, threads: int, extra: list[str]) -> dict[str, float]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    p = run([moe, "bench", "--core", "--json", *extra], capture_output=True, text=True, env=env)
    r = json.loads(p.stdout)
    t = r["topologies"][0]
    dec = {d["batch"]: d["tokens_per_s"] for d in t["decode"]}
    return {
        "prefill512_f32": t["prefill"]["tokens_per_s"],
        "decode1_f32": dec[1],
        "decode16_f32": dec[16],
        "decode64_f32": dec[64],
        "decode1_bf16": r["bf16"]["decode_batch1"]["tokens_per_s"],
        "decode_roofline_f32": r["ceilings"]["decode_roofline_tokens_per_s"],
        "cpu_kernels": r["ceilings"].get("cpu_kernels", "?"),
        "commit": r.get("commit", "?"),
    }


ROWS = [
    ("prefill512_f32", "prefill 512 tokens, f32", 1.0),
    ("decode1_f32", "decode batch 1, f32", 1.0),
    ("decode16_f32", "decode batch 16, f32", 1.1),
    ("decode64_f32", "decode batch 64, f32", 1.1),
    ("decode1_bf16", "decode batch 1, bf16 weights", 1.0),
]


def cpu_flags() -> str:
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
              "avx512_vnni", "amx_bf16"]
    return " ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512"


def cpu_model() -> str:
    try:
        return next(l for l in open("/proc/cpuinfo") if l.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default="target/release/moe", help="the moe binary")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-llama-cpp"), help="build and model directory")
    ap.add_argument("--checkpoint", type=Path, help="benchmark checkpoint (default: the one moe bench writes)")
    ap.add_argument("--version", help="llama-cpp-python version (default: newest)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--moe-args", default="", help="extra arguments to `moe bench --core` (e.g. --cpu-kernels avx2)")
    ap.add_argument("--out", type=Path, help="write medians and ratios here (JSON)")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    src = fetch_sdist(a.work, a.version)
    bin_dir = build(src)
    checkpoint = a.checkpoint
    if checkpoint is None:
        # `moe bench` writes the checkpoint on first use; --core makes it without the long runs.
        probe = subprocess.run([a.moe, "bench", "--print-model-dir"], check=True, capture_output=True, text=True)
        checkpoint = Path(probe.stdout.strip())
    ggufs = convert(src, checkpoint, a.work)

    ours: list[dict] = []
    peer: list[dict] = []
    for r in range(a.rounds):
        log(f"round {r + 1}/{a.rounds}: moe")
        ours.append(moe_core(a.moe, a.threads, a.moe_args.split()))
        log(f"round {r + 1}/{a.rounds}: llama.cpp")
        batched = batched_bench(bin_dir, ggufs["f32"], a.threads, [16, 64])
        peer.append({
            "prefill512_f32": llama_bench(bin_dir, ggufs["f32"], a.threads, 512, 0),
            "decode1_f32": llama_bench(bin_dir, ggufs["f32"], a.threads, 0, 64),
            "decode16_f32": batched[16],
            "decode64_f32": batched[64],
            "decode1_bf16": llama_bench(bin_dir, ggufs["bf16"], a.threads, 0, 64),
        })
        log(f"  moe {ours[-1]}\n  llama.cpp {peer[-1]}")

    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    result = {
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "threads": a.threads},
        "llama_cpp": src.parent.parent.name,
        "moe_cpu_kernels": ours[0]["cpu_kernels"],
        "moe_commit": ours[0]["commit"],
        "rounds": a.rounds,
        "rows": [],
    }
    print(f"{result['machine']['cpu']}; {a.threads} threads; instruction sets: {result['machine']['flags']}")
    print(f"moe kernels: {result['moe_cpu_kernels']}; llama.cpp from {result['llama_cpp']} (GGML_NATIVE)")
    print(f"medians of {a.rounds} interleaved rounds, tokens/s")
    print()
    print("| | moe | llama.cpp | ratio | goal |")
    print("|---|---|---|---|---|")
    for key, name, goal in ROWS:
        m, l = med(ours, key), med(peer, key)
        ratio = m / l if l else float("nan")
        result["rows"].append({"name": name, "key": key, "moe": m, "llama_cpp": l, "ratio": ratio, "goal": goal})
        print(f"| {name} | {m:.0f} | {l:.0f} | {ratio:.2f} | ≥ {goal:.1f} {'met' if ratio >= goal else 'not met'} |")
    roof = med(ours, "decode_roofline_f32")
    share = med(ours, "decode1_f32") / roof
    result["decode1_f32_of_roofline"] = share
    print(f"\ndecode batch 1 f32: {100 * share:.0f}% of the bench's measured roofline ({roof:.0f} tokens/s); goal ≥ 80%")
    result["samples"] = {"moe": ours, "llama_cpp": peer}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
