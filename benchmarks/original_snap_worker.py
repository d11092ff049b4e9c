"""Time the ORIGINAL library's per-head codebook snap (codebook-features 0.1.2) on CPU.

Run ONLY with the reference venv's interpreter (``/tmp/ref-cbf``, recipe in
``tests/fixtures/original/make_fixtures.py``; this worker only touches ``models.py``'s codebook
layers, so it also works with the README's plain ``transformers<5`` pin)::

    /tmp/ref-cbf/bin/python benchmarks/original_snap_worker.py \
        --tokens 4096 --groups 16 --dim 64 --codes 10000 --k 8 --repeats 3

It builds exactly what ``codebook_at=attn_preproj, codebook_type=group, num_codebooks=G,
similarity_metric=inner_product`` builds per layer: ``GroupCodebookLayer(dim=G*D,
num_codes=C, num_codebooks=G, kcodes=K, snap_fn=InnerProductSnapFunction)`` (G independent
``CodebookLayer``s, each = LayerNorm(D) + top-K of x.c/||c|| + mean of the K codes; G python-level
calls per forward, as in the library), in train mode with metric logging off (the
``CodebookModel`` default), and the library's backward with ``--loss`` (default ``aeloss``,
the paper's ``main.yaml``; ``base`` = plain straight-through).

Input: float32 ``[1, N, G*D]`` with ``requires_grad``; loss = ``output.sum()``; one timed
iteration = forward + backward (grads of input, codebooks and LayerNorms), grads cleared
between iterations; ``--warmup`` untimed iterations first (default 1).

Memory (``peak_extra_mib``): torch's CPU allocator is invisible to tracemalloc, so the worker
reads the kernel's counters in ``/proc/self/status``.  It first re-executes itself with
``MALLOC_MMAP_THRESHOLD_=131072`` (unless already set) so that glibc returns every large freed
buffer to the OS and RSS follows live memory.  After building the layer and the input and
running the warmup iteration(s), it notes ``VmRSS`` (baseline), resets the peak with
``echo 5 > /proc/self/clear_refs`` (Linux >= 4.0; if that write fails it falls back to the
process-lifetime ``VmHWM``, an over-estimate whenever imports/setup peaked higher), runs the
timed iterations, then reads ``VmHWM``.  ``peak_extra_mib = (VmHWM - baseline VmRSS) / 1024``
= the extra resident memory a steady-state forward+backward needs at its peak, beyond the
parameters, the input and what stays allocated between iterations.  Use the same method (and
``--threads``) for any implementation you compare against: on a loaded 2-core machine, 2 torch
threads can be 10x slower than 1.

Prints ONE JSON line: ``{"ms_per_iter", "peak_extra_mib", "impl": "codebook-features 0.1.2",
...}`` plus the parameters and measurement details.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _reexec_with_plain_malloc() -> None:
    """Re-run this process with a fixed glibc mmap threshold, so RSS follows live tensors.

    glibc's default *dynamic* mmap threshold grows after big frees, after which big tensors come
    from the heap and stay resident when freed; a fixed threshold (any explicit value) turns that
    off, so every large buffer is mmapped and unmapped and VmRSS/VmHWM track live memory.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _reexec_with_plain_malloc()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, required=True, help="N: tokens (rows) per call")
    ap.add_argument("--groups", type=int, required=True, help="G: codebooks (heads)")
    ap.add_argument("--dim", type=int, required=True, help="D: dim of each codebook (head dim)")
    ap.add_argument("--codes", type=int, required=True, help="C: codes per codebook")
    ap.add_argument("--k", type=int, required=True, help="K: top-k codes averaged")
    ap.add_argument("--repeats", type=int, default=5, help="R: timed iterations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--loss", default="aeloss", help="BaseSnapFunction.loss: aeloss | base | ...")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from codebook_features import models  # only importable in the reference venv

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models.BaseSnapFunction.loss = args.loss  # what CodebookModel.set_codebook_args does
    layer = models.GroupCodebookLayer(
        dim=args.groups * args.dim,
        num_codes=args.codes,
        key="bench_attn_preproj",
        num_codebooks=args.groups,
        snap_fn=models.InnerProductSnapFunction,
        kcodes=args.k,
    )
    layer.disable_logging()  # CodebookModel disables metric logging by default
    layer.train()
    x = torch.randn(1, args.tokens, args.groups * args.dim, requires_grad=True)
    params = list(layer.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        out = layer(x)
        out.sum().backward()

    for _ in range(args.warmup):
        step()
    baseline_kib = _status_kib("VmRSS")
    reset_ok = _reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kib = _status_kib("VmHWM")

    ms = 1000.0 * sum(times) / len(times)
    print(
        json.dumps(
            {
                "ms_per_iter": round(ms, 3),
                "peak_extra_mib": round((peak_kib - baseline_kib) / 1024.0, 1),
                "impl": "codebook-features 0.1.2",
                "ms_min": round(1000.0 * min(times), 3),
                "params": {
                    "tokens": args.tokens,
                    "groups": args.groups,
                    "dim": args.dim,
                    "codes": args.codes,
                    "k": args.k,
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                    "loss": args.loss,
                    "threads": torch.get_num_threads(),
                },
                "mem_method": "VmHWM-VmRSS after warmup, /proc/self/status, clear_refs=5 reset, "
                "MALLOC_MMAP_THRESHOLD_=" + os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
                if reset_ok
                else "VmHWM(process lifetime)-VmRSS(after warmup); clear_refs not writable",
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
