"""Benchmark: the app as a visitor meets it. Starts ``python app.py`` (a fresh process per run, on
a free loopback port) and measures, through ``gradio_client``:

* start: seconds from launching ``python app.py`` to the page answering, model loaded (the
  app's "codebook app ready at" line, then HTTP 200 for the page), wall clock and the CPU time
  the app process used (on a shared machine the two differ);
* first update: seconds from submitting a steered generation to its first streamed update;
* tokens/s: new steered tokens per second through the app, the unsteered side written alongside
  as the Steer tab does (``--max-tokens`` per side), and both sides' tokens per second.
* together (``--clients N``, in the same app run): one client's steered generation of
  ``--together-tokens`` tokens a side, then N clients at once (each its own seed, connected
  before any starts, each with its session open, see :func:`open_sessions`), wall clock from
  the first submit to the last result; the ratio of the two
  is what sharing one batched forward per step (``app/batching.py``) buys (goal: at most 3x for
  16 clients). The app process's CPU time over each of the two is printed too (on a shared
  machine it depends less on the load). These clients wait for their results without reading
  the stream as it comes (see :func:`together`).

Steering uses the model's first topic preset, with its strength, mode and positions (else one
code at strength 1). The machine's load average is printed with the table: on a shared machine the
wall-clock figures depend on it. Run:

    python benchmarks/bench_app.py [--model default] [--runs 3] [--max-tokens 200] \
        [--clients 16] [--together-tokens 40]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
READY = "codebook app ready at"
PROMPT = "Once upon a time,"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far: on a shared machine, wall time
    includes waiting for a core; this does not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(model: str, max_tokens: int) -> tuple[subprocess.Popen, str, float, float]:
    """Launch the app; return the process, its URL, and the wall and CPU seconds until the page
    answered."""
    env = {**os.environ, "CODEBOOK_MODEL": model, "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(free_port()), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1", "CODEBOOK_APP_MAX_NEW_TOKENS": str(max_tokens)}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = None
    for line in proc.stdout:
        if line.startswith(READY):
            url = line.split()[-1]
            break
    if url is None:
        raise RuntimeError(f"the app exited with status {proc.wait()} before it was ready")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    httpx.get(url, timeout=60).raise_for_status()
    return proc, url, time.perf_counter() - began, cpu_seconds(proc.pid)


def client_of(url: str):
    """A ``gradio_client`` client of the app at ``url`` (plain HTTP on the loopback).

    Without certificate checks: ``gradio_client`` opens a new ``httpx`` client for nearly every
    request, and each one loaded the CA bundle into a fresh SSL context (26 ms of CPU each, about
    four per generation) even for an ``http://`` address. 16 clients spent more CPU time on that
    than the app on their 16 generations, on the cores the app runs on."""
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=False)


def first_preset(model: str) -> tuple[str, dict]:
    """``(name, generate's steering arguments)`` of the model's first topic preset."""
    from codebook import hub
    from codebook.analysis.topics import load_topics, preset_steering

    for name, preset in load_topics(hub.resolve_model_dir(model)).items():
        steering = preset_steering(preset)
        return name, {"codes": [str(c) for c in steering.codes], "strength": steering.strength,
                      "mode": steering.mode, "positions": steering.positions}
    return "one code", {"codes": ["0:attn_heads:0:1"], "strength": 1.0, "mode": "add",
                        "positions": "all"}


def open_sessions(clients: list, preset: str) -> None:
    """Open each client's session as a visitor's page does when it loads, before any Generate:
    Gradio builds a session's state (a config for each of the app's blocks, 10-20 ms of the
    server's event loop) at the session's first request, which for a page is its load event
    (the app's ``demo.load``) and for a fresh ``gradio_client`` client would be its first
    generation, charging every client of the together measure a page load. Here the first
    request is ``/topic`` (the preset's codes: cheap, and what a page's topic chip asks; a
    model without presets refuses the name, and the session is open all the same)."""
    from gradio_client.exceptions import AppError

    for client in clients:
        try:
            client.predict(preset, api_name="/topic")
        except AppError:
            pass


def submit(client, steering: dict, max_tokens: int, seed: int):
    """Start one steered generation; its ``gradio_client`` job."""
    return client.submit(PROMPT, steering["codes"], steering["strength"], steering["mode"],
                         steering["positions"], seed, False, 1.0, max_tokens, "",
                         api_name="/generate")


def generate(client, steering: dict, max_tokens: int, seed: int) -> tuple[float, float, dict]:
    """``(seconds to the first update, total seconds, result)`` of one steered generation."""
    began = time.perf_counter()
    job = submit(client, steering, max_tokens, seed)
    first = None
    for _ in job:
        if first is None:
            first = time.perf_counter() - began
    result = job.result()[4]
    return first, time.perf_counter() - began, result


def together(url: str, pid: int, preset: str, steering: dict, clients: int, max_tokens: int,
             seed: int) -> tuple[float, float]:
    """``(seconds, CPU seconds of the app process)`` for ``clients`` clients generating at once,
    from the first submit to the last result (each client connected, its session open,
    beforehand).

    The app streams its updates to every client as usual, but the clients wait for the result
    without iterating over the job: ``gradio_client``'s iterator polls its job every millisecond
    (``time.sleep(0.001)`` holding a lock), on the machine the app runs on, where visitors'
    browsers would not be (16 polling clients took 0.85-1.06 s of CPU time for 16 x 40 tokens,
    waiting ones 0.46-0.68 s, the app 1.6-2.2 s)."""
    connected = [client_of(url) for _ in range(clients)]
    open_sessions(connected, preset)
    cpu = cpu_seconds(pid)
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: submit(connected[i], steering, max_tokens,
                                                 seed + i).result()[4], range(clients)))
    seconds = time.perf_counter() - began
    assert all(r["done"] for r in results)
    return seconds, cpu_seconds(pid) - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description="Time the app: start, first token, tokens/s.")
    parser.add_argument("--model", default=os.environ.get("CODEBOOK_MODEL", "default"))
    parser.add_argument("--runs", type=int, default=3, help="app starts (one generation each)")
    parser.add_argument("--max-tokens", type=int, default=200, help="new tokens per side")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent clients (0: skip the together measure)")
    parser.add_argument("--together-tokens", type=int, default=40,
                        help="new tokens per side in the together measure")
    args = parser.parse_args()

    preset, steering = first_preset(args.model)
    load_before = os.getloadavg()
    starts, start_cpu, firsts, steered, both = [], [], [], [], []
    single, crowd, single_cpu, crowd_cpu = [], [], [], []
    for run in range(args.runs):
        proc, url, seconds, cpu = start(args.model, args.max_tokens)
        try:
            starts.append(seconds)
            start_cpu.append(cpu)
            client = client_of(url)
            generate(client, steering, 8, seed=run)  # warm-up: first-call costs are not per token
            first, total, result = generate(client, steering, args.max_tokens, seed=run)
            firsts.append(first)
            steered.append(result["tokens"][1] / total)
            both.append(sum(result["tokens"]) / total)
            if args.clients:
                for walls, cpus, clients in ((single, single_cpu, 1),
                                             (crowd, crowd_cpu, args.clients)):
                    wall, used = together(url, proc.pid, preset, steering, clients,
                                          args.together_tokens, 100 * run)
                    walls.append(wall)
                    cpus.append(used)
        finally:
            proc.terminate()
            proc.wait(30)

    def row(name: str, values: list[float], unit: str) -> str:
        return (f"| {name} | {statistics.median(values):.3g} {unit} | {min(values):.3g} | "
                f"{max(values):.3g} |")

    print(f"model {args.model!r}, preset {preset!r} ({len(steering['codes'])} codes, strength "
          f"{steering['strength']:g}, mode {steering['mode']}, positions {steering['positions']}), "
          f"{args.runs} runs, {args.max_tokens} new tokens per side, {os.cpu_count()} CPUs, "
          f"load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| measure | median | min | max |\n|---|---|---|---|")
    print(row("start: `python app.py` to ready (wall)", starts, "s"))
    print(row("start: CPU time of the app process", start_cpu, "s"))
    print(row("first streamed update, steered generation", firsts, "s"))
    print(row("steered tokens/s (unsteered side alongside)", steered, "tokens/s"))
    print(row("both sides' tokens/s", both, "tokens/s"))
    if args.clients:
        n, tokens = args.clients, args.together_tokens
        print(row(f"1 client x {tokens} tokens a side", single, "s"))
        print(row(f"{n} clients at once x {tokens} tokens a side", crowd, "s"))
        print(row(f"{n} clients / 1 client (goal: at most 3)",
                  [c / s for c, s in zip(crowd, single, strict=True)], "x"))
        print(row(f"CPU time of the app process, 1 client x {tokens} tokens", single_cpu, "s"))
        print(row(f"CPU time of the app process, {n} clients x {tokens} tokens", crowd_cpu, "s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
