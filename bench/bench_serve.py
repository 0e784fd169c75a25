"""
Benchmark of serve.py: time to first token and tokens/s of streamed answers through the HTTP API (SSE, werkzeug's
threaded server on 127.0.0.1), against calling ChatModel.stream directly in the same process, with 1 and 8
concurrent clients, on a small random Phi. Prints a markdown table.

    python bench/bench_serve.py [--preset=demo] [--max_tokens=64] [--requests=16]
"""

import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import parse_config  # noqa: E402
from multimodal import ChatModel  # noqa: E402
from model import Phi, PhiConfig  # noqa: E402
from serve import ServeConfig, create_app  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


@dataclass
class BenchConfig:
    preset: str = "demo"     # PhiConfig preset of the random model
    max_tokens: int = 64  # new tokens per answer
    requests: int = 16       # answers per measurement (spread over the clients)
    seed: int = 0  # seeds the random model


def direct_request(chat, max_tokens):
    """(time to first piece, seconds, completion tokens) of one answer from ChatModel.stream."""
    usage, start, first = {}, time.perf_counter(), None
    for _ in chat.stream(MESSAGES, max_tokens=max_tokens, temperature=1.0, usage=usage):
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, usage["completion_tokens"]


def http_request(port, max_tokens):
    """The same answer streamed over HTTP; the first piece is the first chunk with content."""
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start, first, tokens = time.perf_counter(), None, 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]}")
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return first, time.perf_counter() - start, tokens


def measure(one_request, clients, n_requests):
    """Run n_requests answers over `clients` threads; returns per-request results and the wall time."""
    results, lock = [], threading.Lock()
    per_client = [n_requests // clients + (i < n_requests % clients) for i in range(clients)]

    def client(n):
        for _ in range(n):
            r = one_request()
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def row(name, clients, results, wall, baseline=None):
    ttft = [r[0] * 1000 for r in results]
    decode = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
    aggregate = sum(r[2] for r in results) / wall
    vs = f"{aggregate / baseline:.2f}x" if baseline else "1.00x"
    return (f"| {name} | {clients} | {statistics.median(ttft):.1f} | {max(ttft):.1f} | "
            f"{statistics.median(decode):.0f} | {aggregate:.0f} | {vs} |"), aggregate


def main(argv):
    cfg = parse_config(BenchConfig, argv, doc=__doc__)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        Phi(PhiConfig.from_preset(cfg.preset)).save_pretrained(tmp)
        chat = ChatModel(tmp, whisper="")
    app = create_app(chat, ServeConfig(max_queue=64))
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    direct = lambda: direct_request(chat, cfg.max_tokens)
    over_http = lambda: http_request(port, cfg.max_tokens)
    for warm in (direct, over_http):
        warm()

    n_params = sum(p.numel() for p in chat.model.parameters()) / 1e6
    print(f"random Phi preset '{cfg.preset}' ({n_params:.1f}M parameters), {cfg.max_tokens} new tokens per answer, "
          f"{cfg.requests} answers per row, torch threads {torch.get_num_threads()}, device cpu\n")
    print("| path | clients | TTFT p50 (ms) | TTFT max (ms) | decode tok/s per stream (p50) | aggregate tok/s | "
          "aggregate vs direct |")
    print("|---|---|---|---|---|---|---|")
    for clients in (1, 8):
        results, wall = measure(direct, clients, cfg.requests)
        line, baseline = row("ChatModel.stream (direct)", clients, results, wall)
        print(line)
        results, wall = measure(over_http, clients, cfg.requests)
        print(row("HTTP SSE /v1/chat/completions", clients, results, wall, baseline)[0])
    server.shutdown()
    print("\nThe model serves one answer at a time (ChatModel.lock), so with 8 clients TTFT includes the wait in the "
          "queue and the aggregate rate stays that of one stream.")


if __name__ == "__main__":
    main(sys.argv[1:])
