"""``python -m cbexport.run``: generate text from a bundle with onnxruntime, numpy and tokenizers
(torch need not be installed).

    python -m cbexport.run --bundle bundle/ --prompt "Once upon a time" --max-new-tokens 60
    python -m cbexport.run --bundle bundle/ --prompt "Once upon a time" --steer dragons
    python -m cbexport.run --bundle bundle/ --prompt "Once upon a time" --codes 2:attn_heads:3:17
"""

from __future__ import annotations

import argparse
import sys

from cbexport.manifest import BundleError
from cbexport.runtime import PROVIDERS, CodebookRuntime
from codebook.steering_spec import MODES, POSITIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbexport.run",
                                     description="Generate text from a codebook bundle.")
    parser.add_argument("--bundle", required=True, help="bundle directory (python -m cbexport)")
    parser.add_argument("--prompt", help="text to continue")
    steer = parser.add_mutually_exclusive_group()
    steer.add_argument("--steer", metavar="TOPIC", help="steer towards a topic preset")
    steer.add_argument("--codes", metavar="SPEC",
                       help="steer with codes LAYER:SITE:HEAD:CODE[,...] or a JSON list")
    parser.add_argument("--strength", type=float, help="steering strength (default 1, or the "
                                                       "topic's)")
    parser.add_argument("--mode", choices=MODES, help="add the codes (default) or replace all "
                                                      "active codes of their heads")
    parser.add_argument("--positions", choices=POSITIONS,
                        help="steer all tokens (default), only the prompt or only generated ones")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) is greedy; above 0 samples")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="auto (default): CUDA when onnxruntime can really use it, else CPU")
    parser.add_argument("--list-topics", action="store_true", help="print the topics and exit")
    args = parser.parse_args(argv)
    if args.prompt is None and not args.list_topics:
        parser.error("--prompt is required")
    steering_options = (args.strength, args.mode, args.positions)
    if not (args.steer or args.codes) and any(o is not None for o in steering_options):
        parser.error("--strength, --mode and --positions need --steer or --codes")

    try:
        runtime = CodebookRuntime(args.bundle, provider=args.provider)
        if args.list_topics:
            print("\n".join(runtime.topics) or "(this bundle has no topic presets)")
            return 0
        steering = None
        if args.steer or args.codes:
            steering = runtime.steering(codes=args.codes, topic=args.steer,
                                        strength=args.strength, mode=args.mode,
                                        positions=args.positions)
        text = runtime.generate_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, seed=args.seed,
                                     steering=steering)
    except (BundleError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"(onnxruntime provider: {runtime.provider})", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
