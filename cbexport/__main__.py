"""``python -m cbexport``: export a codebook model as a bundle (ONNX, TorchScript, tokenizer,
metadata, model card, verification report).

    python -m cbexport --model default --format onnx,torchscript --out bundle/ --verify
"""

from __future__ import annotations

import argparse
import sys

from cbexport.manifest import FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cbexport",
        description="Export a codebook model to ONNX and/or TorchScript as a self-describing "
                    "bundle directory.",
    )
    parser.add_argument("--model", required=True,
                        help="'default' (the embedded model), a model directory or a Hub id")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated formats: {', '.join(FORMATS)} (default: both)")
    parser.add_argument("--out", required=True, help="bundle directory to create")
    parser.add_argument("--verify", action="store_true",
                        help="full verification: logits on several prompts, 64 greedy tokens, "
                             "steered generation (default: a quick logits check)")
    parser.add_argument("--force", action="store_true",
                        help="replace the output directory if it is not empty")
    parser.add_argument("--no-optimize", action="store_true",
                        help="skip the ONNX exporter's graph optimiser (faster export)")
    args = parser.parse_args(argv)

    # Imported here so that --help answers without loading torch.
    from cbexport.bundle import ExportError, export_bundle
    from cbexport.card import human_size
    from cbexport.manifest import BundleError

    try:
        manifest = export_bundle(args.model, args.out, args.format, verify=args.verify,
                                 overwrite=args.force, optimize=not args.no_optimize,
                                 log=lambda message: print(message, file=sys.stderr))
    except (ExportError, BundleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {human_size(size)}"
                      for name, size in manifest["file_sizes"].items())
    print(f"bundle written to {args.out} ({sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
