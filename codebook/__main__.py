"""``python -m codebook``: command-line tools.

Each subcommand is registered by an ``add_<name>_parser(subparsers)`` function listed in
:data:`SUBCOMMANDS`; it sets ``func`` (called with the parsed arguments, returns an exit status or
``None`` for success). Heavy imports happen inside ``func``, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from codebook.analysis.cli import add_analysis_parsers


def add_convert_original_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-original",
        help="convert a checkpoint of the original codebook-features library to this format",
        description="Convert a codebook model saved by the paper's original library "
        "(codebook-features 0.1.2: config.json with model_type 'codebook') into this project's "
        "format, so that it works with steering, analysis and export.",
    )
    parser.add_argument("src", metavar="SRC",
                        help="the original codebook checkpoint: a directory or Hub repo id")
    parser.add_argument("--base", metavar="BASE",
                        help="its base model, a directory or Hub repo id (the original config "
                        "does not name it; needed unless config.json has base_model_name_or_path)")
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="directory to write the converted model to")
    parser.add_argument("--revision", help="revision of SRC on the Hub (for BASE write ID@REV)")
    parser.set_defaults(func=_convert_original)


def _convert_original(args: argparse.Namespace) -> None:
    from codebook.original import convert_original

    model = convert_original(args.src, args.out, args.base, revision=args.revision)
    c = model.codebook_config
    sizes = {(c.num_codes_at(site), c.k_at(site)) for site in c.sites}
    if len(sizes) == 1:
        codes = f"{c.num_codes} codes, k={c.k}"
    else:  # the original library sets C and k per site
        codes = ", ".join(f"{site} {c.num_codes_at(site)} codes k={c.k_at(site)}"
                          for site in c.sites)
    print(f"wrote {args.out}: {model.architecture.name}, sites {', '.join(c.sites)} at layers "
          f"{c.layers}, {codes}, similarity {c.similarity}")


# Every subcommand's registration function, in the order --help lists them.
SUBCOMMANDS = [add_convert_original_parser, add_analysis_parsers]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m codebook",
                                     description="Codebook features: command-line tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        # Bad input (a wrong path, an unsupported checkpoint): one line, no traceback.
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
