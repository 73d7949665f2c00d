"""A bounded load generator for the prediction service (localhost): concurrent clients, each sending its requests
one after another over one keep-alive connection, for a fixed number of requests or a time limit, whichever comes
first. bench.py --only serve and the service's tests use it.

    figures = loadgen.run("http://127.0.0.1:8000/predict", bodies, concurrency=8, requests=200, limit_s=60)
    # {"requests": 200, "errors": 0, "seconds": ..., "requests_per_s": ..., "p50_ms": ..., "p95_ms": ..., "p99_ms": ...}

A body is (bytes, content type): one image sent raw, as the service accepts it. Latency is from the first byte sent
to the whole answer read, per request.
"""
import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np

from kit.base import errors

SERVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "serve.py")


def run(url, bodies, concurrency, requests, limit_s=60.0):
    parsed = urllib.parse.urlsplit(url)
    latencies, failures, lock = [], [], threading.Lock()
    issued = iter(range(requests))
    deadline = time.perf_counter() + limit_s

    def client(k):
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=limit_s)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(issued, None)
                if i is None:
                    return
                body, content_type = bodies[(i + k) % len(bodies)]
                start = time.perf_counter()
                try:
                    conn.request("POST", parsed.path + (f"?{parsed.query}" if parsed.query else ""), body=body,
                                 headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                    conn.close()
                    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=limit_s)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if ok else failures).append(elapsed)
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s + 30)
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    pct = {f"p{q}_ms": float(np.percentile(ms, q)) if len(ms) else float("nan") for q in (50, 95, 99)}
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(failures), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds, **pct}


def start_server(checkpoint, *flags, timeout_s=120):
    """(process, base URL) of serve.py on a free localhost port, once it listens."""
    proc = subprocess.Popen([sys.executable, SERVE, "--checkpoint", checkpoint, "--host", "127.0.0.1", "--port", "0",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (...)", printed once it listens
    if " on http://" not in line:
        proc.kill()
        raise errors.ConfigError(f"serve.py did not start: {(line + proc.stderr.read()).strip().splitlines()[-1:]}")
    return proc, line.split(" on ", 1)[1].split(" ")[0]


def compare_batching(checkpoint, bodies, concurrencies=(1, 8, 32), requests=200, limit_s=60.0, max_batch=32,
                     max_wait_ms=5.0):
    """Throughput and latency with dynamic batching and without it (max_batch 1), side by side: both services run
    at once (an idle one costs nothing), and at each concurrency the two are measured one after the other."""
    services = {"batching": ["--max_batch", str(max_batch), "--max_wait_ms", str(max_wait_ms)],
                "no batching": ["--max_batch", "1"]}
    started = {name: start_server(checkpoint, *flags) for name, flags in services.items()}
    rows = []
    try:
        for _, url in started.values():  # warm-up: the first calls pay for allocation and kernel choice
            run(url + "/predict", bodies, 2, 8, limit_s)
        for concurrency in concurrencies:
            for name, (_, url) in started.items():
                rows.append({"service": name, **run(url + "/predict", bodies, concurrency, requests, limit_s)})
    finally:
        for proc, _ in started.values():
            proc.terminate()
            proc.wait(30)
    return rows
