"""The server under concurrent load, on loopback: dynamic batching against one request at a time.

Starts ``llava-uhd serve`` (the bundled model unless --model) twice in a row, with --max-batch 16 and with
--max-batch 1, and sends each the same 200 chat requests from 16 concurrent clients: images of mixed sizes
(8 sizes x 5 colours, each image asked about 5 times, so the image-feature cache meets repeats), greedy,
--max-tokens new tokens each. Reports throughput, p50/p99 latency, errors, the server's peak RSS, the
seconds per stage from /metrics, and the latency of an image's first request against its repeats.

    PYTHONPATH=src python benchmarks/serve.py            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

SIZES = [(224, 224), (320, 240), (640, 480), (800, 800), (1024, 768), (1280, 800), (500, 1500), (2000, 600)]
COLOURS = [(200, 40, 40), (40, 160, 60), (30, 70, 200), (220, 200, 40), (120, 40, 160)]
STAGES = ("image_decode", "slicing", "vit", "resampler", "prefill", "decode_steps")


def _images() -> list[str]:
    urls = []
    for w, h in SIZES:
        for colour in COLOURS:
            image = Image.new("RGB", (w, h), colour)
            image.paste((255, 255, 255), (w // 4, h // 4, w // 2, h // 2))
            out = io.BytesIO()
            image.save(out, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return urls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def _metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return {
        k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    }


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_once(args: argparse.Namespace, max_batch: int, requests: list[tuple[int, str]]) -> dict:
    """One server with ``--max-batch max_batch`` under the whole load; its numbers."""
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a chatty server never blocks
        return _measure(args, max_batch, requests, log)


def _measure(args: argparse.Namespace, max_batch: int, requests: list[tuple[int, str]], log) -> dict:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "llava_uhd.cli",
        "serve",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "256",
        "--device",
        "cpu",
    ]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-2000:]}") from None
                time.sleep(0.2)
        seen: set[int] = set()
        lock = threading.Lock()

        def one(item: tuple[int, str]) -> tuple[int, float, bool]:
            index, url = item
            with lock:
                first = index not in seen
                seen.add(index)
            body = {
                "model": "m",
                "max_tokens": args.max_tokens,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "How many shapes are there?"},
                        ],
                    }
                ],
            }
            status, seconds = _post(base + "/v1/chat/completions", body)
            return status, seconds, first

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, requests))
        wall = time.perf_counter() - start
        metrics = _metrics(base)
        rss = _peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(r[1] for r in results)
    ok = [r for r in results if r[0] == 200]
    return {
        "max_batch": max_batch,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "peak_rss_mib": rss,
        "mean_batch": metrics["llava_uhd_batch_size_sum"] / max(metrics["llava_uhd_batch_size_count"], 1),
        "cache_hits": metrics["llava_uhd_image_cache_hits_total"],
        "cache_misses": metrics["llava_uhd_image_cache_misses_total"],
        "images_encoded": metrics["llava_uhd_images_encoded_total"],
        "stages_s": {s: metrics[f'llava_uhd_stage_seconds_total{{stage="{s}"}}'] for s in STAGES},
        "first_p50_s": statistics.median([r[1] for r in results if r[2]]),
        "repeat_p50_s": statistics.median([r[1] for r in results if not r[2]]),
    }


def table(runs: list[dict]) -> str:
    head = "| max batch | requests | errors | wall s | req/s | p50 s | p99 s | peak RSS MiB | mean batch | cache hits/misses | images encoded | first-image p50 s | repeat p50 s |"
    lines = [head, "|" + " --- |" * 13]
    for r in runs:
        lines.append(
            f"| {r['max_batch']} | {r['requests']} | {r['errors']} | {r['wall_s']:.1f} | {r['throughput_rps']:.2f} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['mean_batch']:.1f} | "
            f"{r['cache_hits']:.0f}/{r['cache_misses']:.0f} | {r['images_encoded']:.0f} | {r['first_p50_s']:.2f} | "
            f"{r['repeat_p50_s']:.2f} |"
        )
    lines += [
        "",
        "| max batch | " + " | ".join(f"{s} s" for s in STAGES) + " |",
        "|" + " --- |" * (len(STAGES) + 1),
    ]
    for r in runs:
        lines.append(f"| {r['max_batch']} | " + " | ".join(f"{r['stages_s'][s]:.2f}" for s in STAGES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a saved model folder (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    urls = _images()
    repeats = -(-args.requests // len(urls))
    requests = [(i, url) for i, url in enumerate(urls) for _ in range(repeats)][: args.requests]
    random.Random(0).shuffle(requests)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = [run_once(args, max_batch, requests) for max_batch in (16, 1)]
    speedup = runs[0]["throughput_rps"] / runs[1]["throughput_rps"]
    print(table(runs))
    print(f"\ndynamic batching: {speedup:.2f}x the throughput of one request at a time")
    # The model thread runs the vision stages of the batched run too, so its wall time is at least their
    # seconds: the one-at-a-time wall over them bounds the speedup wherever batching does not shorten
    # them (a CPU does the same arithmetic for a packed batch as for its pieces one by one).
    vision = runs[0]["stages_s"]["vit"] + runs[0]["stages_s"]["resampler"]
    bound = runs[1]["wall_s"] / vision if vision else float("inf")
    print(
        f"the batched run spent {vision:.1f} s in the ViT and the resampler; against the one-at-a-time "
        f"run's {runs[1]['wall_s']:.1f} s wall that bounds batching at {bound:.2f}x unless they get faster"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "speedup": speedup, "bound": bound}, indent=2) + "\n")


if __name__ == "__main__":
    main()
