#!/usr/bin/env python3
"""Fair service as a user sees it, through the official `openai` client against
`moe serve --demo --tenants demo --max-running 16`, run once with `--scheduling fair` and once
with `--scheduling fcfs`:

- the time to first token of `writers`' one-at-a-time 8-token requests, alone and while `coders`
  keeps 64 requests of 64 tokens in flight (median of 15; acceptance: loaded <= 5x idle);
- with both backlogged (coders 64 in flight, writers 16), the share of generated tokens writers
  gets (from the router's moe_scheduled_tokens_total over a window; acceptance: 0.45-0.55).

    pip install openai httpx
    cargo build --release
    python benches/fairness_http.py [--moe target/release/moe] [--json]
"""
import argparse
import asyncio
import glob
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import httpx
from openai import AsyncOpenAI


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def demo_keys():
    """The demo tenants' keys from the demo model's tenants.toml (written by `--demo`)."""
    paths = sorted(glob.glob("/tmp/**/tenants.toml", recursive=True), key=os.path.getmtime)
    if not paths:
        raise SystemExit("no demo tenants.toml found: run `moe serve --demo` once")
    text = open(paths[-1]).read()
    keys = dict(re.findall(r'name = "([^"]+)"\s*\napi_key = "([^"]+)"', text))
    return keys


def scheduled(metrics_url, tenant):
    text = httpx.get(metrics_url).text
    m = re.search(r'moe_scheduled_tokens_total\{tenant="%s",kind="decode"\} ([0-9.e+]+)' % re.escape(tenant), text)
    if m is None:
        m = re.search(r'moe_scheduled_tokens_total\{kind="decode",tenant="%s"\} ([0-9.e+]+)' % re.escape(tenant), text)
    return float(m.group(1)) if m else 0.0


# Each tenant runs with its own adapter (the demo's: writers `prose`, coders `code`).
MODEL = {"writers": "prose", "coders": "code"}


async def ttft(client, prompt, n):
    start = time.perf_counter()
    stream = await client.completions.create(model=MODEL["writers"], prompt=prompt, max_tokens=n, stream=True)
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text is not None:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


async def loop(client, model, n, stop):
    i = 0
    while not stop.is_set():
        i += 1
        try:
            await client.completions.create(model=model, prompt=f"def f{i}(x):", max_tokens=n)
        except Exception as e:  # noqa: BLE001 - a refused request ends this client's loop
            print("loop request failed:", e, file=sys.stderr)
            return


async def side(moe, policy, keys):
    http, metrics = free_port(), free_port()
    proc = subprocess.Popen([moe, "serve", "--demo", "--tenants", "demo", "--max-running", "16",
                             "--scheduling", policy, "--listen", f"127.0.0.1:{free_port()}",
                             "--http-listen", f"127.0.0.1:{http}", "--metrics-listen", f"127.0.0.1:{metrics}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{http}/v1"
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{metrics}/metrics").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        writers = AsyncOpenAI(base_url=base, api_key=keys["writers"], max_retries=0,
                              http_client=httpx.AsyncClient(limits=limits, timeout=600))
        coders = AsyncOpenAI(base_url=base, api_key=keys["coders"], max_retries=0,
                             http_client=httpx.AsyncClient(limits=limits, timeout=600))
        for _ in range(3):
            await ttft(writers, "Once upon a time", 8)
        idle = [await ttft(writers, "Once upon a time", 8) for _ in range(15)]

        stop = asyncio.Event()
        flood = [asyncio.create_task(loop(coders, MODEL["coders"], 64, stop)) for _ in range(64)]
        await asyncio.sleep(2.0)
        loaded = [await ttft(writers, "Once upon a time", 8) for _ in range(15)]

        # Both backlogged: writers keeps 16 in flight beside coders' 64.
        more = [asyncio.create_task(loop(writers, MODEL["writers"], 64, stop)) for _ in range(16)]
        await asyncio.sleep(2.0)
        url = f"http://127.0.0.1:{metrics}/metrics"
        w0, c0 = scheduled(url, "writers"), scheduled(url, "coders")
        await asyncio.sleep(8.0)
        w1, c1 = scheduled(url, "writers"), scheduled(url, "coders")
        stop.set()
        await asyncio.gather(*flood, *more)
        share = (w1 - w0) / max(1.0, (w1 - w0) + (c1 - c0))
        return {"idle_ttft_ms": 1e3 * statistics.median(idle), "loaded_ttft_ms": 1e3 * statistics.median(loaded),
                "ttft_ratio": statistics.median(loaded) / statistics.median(idle), "writers_share": share,
                "tokens_per_s": ((w1 - w0) + (c1 - c0)) / 8.0}
    finally:
        proc.terminate()
        proc.wait()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", default="target/release/moe")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    # Make sure the demo model (and its tenants file) exists.
    subprocess.run([a.moe, "demo-model", "--help"], stdout=subprocess.DEVNULL, check=False)
    warm = subprocess.Popen([a.moe, "serve", "--demo", "--listen", f"127.0.0.1:{free_port()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    warm.terminate()
    warm.wait()
    keys = demo_keys()
    out = {policy: await side(a.moe, policy, keys) for policy in ("fair", "fcfs")}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'':44} {'fair':>10} {'fcfs':>10}")
    for k, label in [("idle_ttft_ms", "writers' TTFT alone, median ms"),
                     ("loaded_ttft_ms", "... beside coders' 64 in flight, median ms"),
                     ("ttft_ratio", "... loaded / idle"),
                     ("writers_share", "writers' token share, 16 vs 64 in flight"),
                     ("tokens_per_s", "generated tokens/s while both backlogged")]:
        print(f"{label:44} {out['fair'][k]:>10.2f} {out['fcfs'][k]:>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
