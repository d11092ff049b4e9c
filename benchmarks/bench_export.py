"""Benchmark: generation speed of an exported bundle (onnxruntime) against torch eager.

Exports the model once (timed, file sizes listed), then generates ``--new-tokens`` greedy tokens
from a ``--prompt-tokens``-token prompt at batch 1 and 8, unsteered and steered, with torch eager
(``CodebookModel.generate``) and with the bundle's torch-free runtime, and prints both side by
side. Each figure is the best of ``--repeats`` runs after a warm-up. Run:

    python benchmarks/bench_export.py [--model default] [--threads 2]

Without ``--model`` it uses the embedded ``default`` model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cbexport.bundle import export_bundle  # noqa: E402
from cbexport.runtime import CodebookRuntime  # noqa: E402
from cbexport.verify import torch_generate, verification_steering  # noqa: E402
from codebook import CodebookModel  # noqa: E402


def best_time(fn, repeats: int, *args, **kwargs) -> float:
    fn(*args, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default",
                        help="codebook model: default (the embedded one), a directory or a Hub id")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both torch and onnxruntime (default: their own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = CodebookModel.from_pretrained(args.model, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        start = time.perf_counter()
        manifest = export_bundle(model, bundle, verify=False)
        export_seconds = time.perf_counter() - start
        runtime = CodebookRuntime(bundle, provider="cpu", threads=args.threads)
        spec = verification_steering(manifest, runtime.topics)
        vocab = manifest["model"]["vocab_size"]
        rows = []
        for batch in (1, 8):
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen).tolist()
            for steered in (False, True):
                t_torch = best_time(torch_generate, args.repeats, model, prompts,
                                    args.new_tokens, runtime.pad_id,
                                    spec if steered else None)
                t_onnx = best_time(runtime.generate, args.repeats, prompts, args.new_tokens,
                                   steering=spec if steered else None, stop_at_eos=False)
                tokens = batch * args.new_tokens
                rows.append((batch, "steered" if steered else "unsteered", tokens / t_torch,
                             tokens / t_onnx, t_torch / t_onnx))
        sizes = manifest["file_sizes"]

    print(f"model: {args.model}")
    print(f"threads: {args.threads or 'default'} (torch {torch.get_num_threads()}); "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
          f"best of {args.repeats}; steering: {', '.join(map(str, spec.codes))} "
          f"(strength {spec.strength})")
    print()
    print("| batch | steering | torch eager tok/s | ONNX runtime tok/s | ONNX / torch |")
    print("|---:|---|---:|---:|---:|")
    for batch, steering, torch_tps, onnx_tps, ratio in rows:
        print(f"| {batch} | {steering} | {torch_tps:,.0f} | {onnx_tps:,.0f} | {ratio:.1f}x |")
    print()
    print(f"export (ONNX + TorchScript + quick verification): {export_seconds:.1f} s "
          f"(ONNX {manifest['onnx']['export_seconds']:.1f} s, "
          f"TorchScript {manifest['torchscript']['export_seconds']:.1f} s)")
    print("files: " + ", ".join(f"{name} {size / 1024:,.0f} KiB" for name, size in sizes.items()))


if __name__ == "__main__":
    main()
