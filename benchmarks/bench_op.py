"""Benchmark: the chunked ``codebook::topk_codebook`` op against a naive implementation.

The naive implementation materialises the whole ``[tokens, groups, codes]`` score matrix (what
most codebook code does, the paper's library included). For each shape and implementation, a
fresh subprocess builds the inputs, records its peak resident memory, runs one forward+backward
(loss = sum of the output) and records the peak again: the difference is the peak extra memory.
It then times ``--repeats`` forward+backward passes (more for fast shapes, a second's worth)
after a warm-up and keeps the best. With ``--rounds`` above 1 the
implementations' subprocesses alternate that many times and each keeps its best, so that load
from other work on a shared machine slows both alike. Run:

    python benchmarks/bench_op.py [--repeats 3] [--threads 2] [--rounds 2]

Shapes: ``small``; ``recipe``, one layer's call in the default training recipe (batch 16 x 256
tokens, 8 heads of 8 dims, 512 codes); ``large``, many codes in wide groups.

If ``CODEBOOK_FEATURES_PYTHON`` points at a Python with the paper's original library
(``codebook-features``, see ../shared/README.md for the recipe), its snap function is timed on the
same shapes too (``benchmarks/original_snap_worker.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "small": dict(tokens=512, groups=4, dim=16, codes=256, k=4),
    "recipe": dict(tokens=4096, groups=8, dim=8, codes=512, k=8),
    "large": dict(tokens=4096, groups=16, dim=64, codes=10_000, k=8),
}

WORKER = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from codebook.ops import topk_codebook

def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

def naive(x, codebook, k):
    xn = torch.nn.functional.normalize(x, dim=-1)
    cn = torch.nn.functional.normalize(codebook, dim=-1)
    scores = torch.einsum("ngd,gcd->ngc", xn, cn)          # the full score matrix
    idx = scores.topk(k, dim=-1).indices
    groups = torch.arange(codebook.shape[0])[:, None]
    out = codebook[groups, idx].sum(-2)
    return x + (out - x).detach() + (out - out.detach())   # straight-through

impl, n, g, d, c, k, repeats, threads = sys.argv[2], *map(int, sys.argv[3:])
torch.set_num_threads(threads)
torch.manual_seed(0)

def make_step(n, g, d, c, k):
    x = torch.randn(n, g, d, requires_grad=True)
    codebook = torch.randn(g, c, d, requires_grad=True)
    if impl == "chunked":
        fn = lambda: topk_codebook(x, codebook, k, combine="sum", reconstruction_weight=0.0)[0]
    else:
        fn = lambda: naive(x, codebook, k)
    return lambda: fn().sum().backward()

# One-off costs (lazy imports, dispatcher set-up on the first call) are not the op's memory.
make_step(4, g, d, 2 * k, k)()
step = make_step(n, g, d, c, k)
before = peak_rss_mib()
step()
extra = peak_rss_mib() - before
times = []
# Fast shapes repeat for a second at least: their best of 3 is at the mercy of the scheduler.
while len(times) < repeats or (sum(times) < 1.0 and len(times) < 1000):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"ms_per_iter": 1000 * min(times), "peak_extra_mib": extra}))
"""


def run_worker(impl: str, shape: dict, repeats: int, threads: int) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    args = [str(shape[key]) for key in ("tokens", "groups", "dim", "codes", "k")]
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, repo, impl, *args, str(repeats), str(threads)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_original(python: str, shape: dict, repeats: int) -> dict | None:
    worker = Path(__file__).with_name("original_snap_worker.py")
    args = ["--tokens", shape["tokens"], "--groups", shape["groups"], "--dim", shape["dim"],
            "--codes", shape["codes"], "--k", shape["k"], "--repeats", repeats]
    proc = subprocess.run([python, str(worker), *map(str, args)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        print(f"original library worker failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    original = os.environ.get("CODEBOOK_FEATURES_PYTHON")
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        started = time.time()
        results = {}
        for _ in range(args.rounds):
            for impl in ("naive", "chunked"):
                result = run_worker(impl, shape, args.repeats, args.threads)
                best = results.setdefault(impl, result)
                best["ms_per_iter"] = min(best["ms_per_iter"], result["ms_per_iter"])
        if original:
            results["codebook-features"] = run_original(original, shape, args.repeats)
        for impl, result in results.items():
            if result:
                rows.append((name, impl, result["ms_per_iter"], result["peak_extra_mib"]))
        print(f"[{name} done in {time.time() - started:.0f} s]", file=sys.stderr)

    desc = {n: "N={tokens} g={groups} d={dim} C={codes} k={k}".format(**s)
            for n, s in SHAPES.items()}
    print(f"\nforward+backward, best of >= {args.repeats} x {args.rounds} round(s), "
          f"{args.threads} threads")
    print(f"| shape | {'implementation':<18} | ms / iter | peak extra MiB | vs naive |")
    print("|---|---|---:|---:|---|")
    naive = {row[0]: row for row in rows if row[1] == "naive"}
    for name, impl, ms, mib in rows:
        base = naive[name]
        ratio = f"{ms / base[2]:.2f}x time, {mib / max(base[3], 1e-9):.3f}x memory"
        print(f"| {name} ({desc[name]}) | {impl:<18} | {ms:9.1f} | {mib:14.1f} | {ratio} |")


if __name__ == "__main__":
    main()
