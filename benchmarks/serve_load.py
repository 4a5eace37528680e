"""Load test of the server on loopback: C concurrent clients x R requests each, then the same kind of requests one
by one; prints latency percentiles, throughput and the speed-up that batching gives.

    python benchmarks/serve_load.py --model CKPT                       # a checkpoint, on this machine's device
    python benchmarks/serve_load.py --tiny                             # the tiny test model (CPU, seconds)
    python benchmarks/serve_load.py --random-model --llm-config llama-7b --vision-tower ViT-L-14-336 \
        --device cuda --dtype bf16                                     # LLaVA-1.5-7B's shape, untrained

The server is the real one (mm_moslora.serve: HTTP, JSON, base64 images, the batching scheduler) in a thread of
this process; clients are threads speaking HTTP to it. Every request asks about its own synthetic image with
`max_tokens` (untrained models never stop early, so each reply is that long). A warm-up round (one request per
client, then two alone) runs first, untimed. Every request must be answered with a 200: the script exits 1
otherwise. The sequential run sends `--sequential` requests (default: one per client) one after another.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.bench_generate import QUESTIONS, random_engine  # noqa: E402
from mm_moslora.infer import InferenceEngine  # noqa: E402
from mm_moslora.model.build import parse_dtype  # noqa: E402
from mm_moslora.serve.app import ServeConfig, Service  # noqa: E402
from mm_moslora.serve.cli import BackgroundServer, listen  # noqa: E402
from mm_moslora.serve.protocol import Defaults  # noqa: E402

MODEL_NAME = "bench"


def synthetic_images(n: int, seed: int = 0) -> list[str]:
    """n different PNG data URLs (blocky random images of 200-640 pixels a side)."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        size = (int(rng.integers(200, 640)), int(rng.integers(200, 640)))
        image = Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


class Client:
    """One HTTP/1.1 keep-alive connection, as an application's client keeps."""

    def __init__(self, host_port: str):
        self.connection = http.client.HTTPConnection(host_port, timeout=600)

    def ask(self, image_url: str, question: str, max_tokens: int, stream: bool) -> tuple[float, int, int]:
        """-> (seconds, HTTP status, completion tokens)."""
        body = json.dumps({"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                           **({"stream_options": {"include_usage": True}} if stream else {}),
                           "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": image_url}},
                               {"type": "text", "text": question}]}]})
        start = time.perf_counter()
        self.connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - start
        if response.status != 200:
            return seconds, response.status, 0
        if stream:
            events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]" or "usage" not in events[-2]:
                return seconds, 599, 0  # a stream that did not end properly counts as lost
            return seconds, 200, json.loads(events[-2])["usage"]["completion_tokens"]
        return seconds, 200, json.loads(data)["usage"]["completion_tokens"]


def run_clients(url: str, jobs: list[list[tuple]], max_tokens: int) -> tuple[list[tuple], float]:
    """jobs[c]: the (image_url, question, stream) requests of client c, sent in order -> (results, wall seconds)."""
    host_port = url.removeprefix("http://")
    barrier = threading.Barrier(len(jobs))

    def client(requests: list[tuple]) -> list[tuple]:
        connection = Client(host_port)
        barrier.wait()
        return [connection.ask(image, question, max_tokens, stream) for image, question, stream in requests]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [r for rs in pool.map(client, jobs) for r in rs]
    return results, time.perf_counter() - start


def summary(name: str, results: list[tuple], seconds: float, n_expected: int) -> dict:
    latencies = np.array([r[0] for r in results])
    answered = sum(r[1] == 200 for r in results)
    tokens = sum(r[2] for r in results if r[1] == 200)
    report = {"requests": n_expected, "answered": answered, "seconds": round(seconds, 3),
              "requests_per_s": round(answered / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
              "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
              "latency_p95_s": round(float(np.percentile(latencies, 95)), 3)}
    print(f"{name}: {answered}/{n_expected} answered in {seconds:.2f} s = {report['requests_per_s']:.2f} requests/s, "
          f"{report['tokens_per_s']:.0f} tokens/s; latency p50 {report['latency_p50_s']:.3f} s, "
          f"p95 {report['latency_p95_s']:.3f} s", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder")
    source.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoint (written to a temp folder)")
    source.add_argument("--random-model", action="store_true", help="an untrained model of --llm-config's shape")
    parser.add_argument("--llm-config", default="llama-7b", help="with --random-model: tiny, llama-7b or a JSON file")
    parser.add_argument("--vision-tower", default="ViT-L-14-336", help="with --random-model: an open_clip architecture")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--sequential", type=int, default=None, help="requests sent one by one (default: --clients)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-every", type=int, default=4, help="every k-th request streams (0: none)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")

    started = time.perf_counter()
    if args.random_model:
        engine = random_engine(args.llm_config, args.vision_tower, args.device, parse_dtype(dtype))
    else:
        model = args.model
        if args.tiny:
            import tempfile

            from tests.helpers import make_tiny_checkpoint
            model = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        engine = InferenceEngine.from_checkpoint(model, device=args.device, dtype=dtype)
    print(f"model ready in {time.perf_counter() - started:.1f} s on {args.device} ({dtype}); decode path "
          f"{engine.decode_path()}", flush=True)
    service = Service(ServeConfig(MODEL_NAME, max_request_bytes=64 * 2**20, max_batch_size=args.max_batch_size,
                                  gather_s=args.batch_wait_ms / 1000,
                                  defaults=Defaults(0.0, 1.0, args.max_tokens)))
    service.attach(engine)
    server = BackgroundServer(service, listen("127.0.0.1", 0))

    n_images = args.clients * args.requests
    images = synthetic_images(n_images)
    stream_at = (lambda k: args.stream_every > 0 and k % args.stream_every == 0)
    jobs = [[(images[c * args.requests + r], QUESTIONS[(c + r) % len(QUESTIONS)], stream_at(c * args.requests + r))
             for r in range(args.requests)] for c in range(args.clients)]
    warm_jobs = [[job[0]] for job in jobs]
    run_clients(server.url, warm_jobs, args.max_tokens)
    run_clients(server.url, [[jobs[0][0], jobs[1][0]]], args.max_tokens)
    before = service.scheduler.stats()

    results, seconds = run_clients(server.url, jobs, args.max_tokens)
    concurrent = summary(f"{args.clients} clients x {args.requests} requests", results, seconds, n_images)
    after = service.scheduler.stats()
    sizes = {size: n - before["batch_sizes"].get(size, 0) for size, n in after["batch_sizes"].items()}
    sizes = {size: n for size, n in sizes.items() if n}
    concurrent["batch_sizes"] = sizes
    print(f"batches formed: {sum(sizes.values())}, sizes {sizes}", flush=True)

    n_sequential = args.sequential or args.clients
    one_by_one = [[job for client in jobs for job in client][:n_sequential]]
    results, seconds = run_clients(server.url, one_by_one, args.max_tokens)
    sequential = summary(f"{n_sequential} requests one by one", results, seconds, n_sequential)
    speedup = concurrent["requests_per_s"] / sequential["requests_per_s"]
    print(f"throughput under concurrency / one by one: {speedup:.2f}x", flush=True)
    server.stop()

    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "dtype": dtype,
              "model": args.model or ("tiny" if args.tiny else f"random {args.llm_config} + {args.vision_tower}"),
              "max_tokens": args.max_tokens, "concurrent": concurrent, "sequential": sequential,
              "speedup": round(speedup, 2)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    lost = concurrent["requests"] - concurrent["answered"] + sequential["requests"] - sequential["answered"]
    if lost:
        print(f"error: {lost} requests were not answered with a 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
