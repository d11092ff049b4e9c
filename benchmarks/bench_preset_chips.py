"""How often each topic chip of the app steers a story to its topic, as a visitor would see it.

For every preset of a model's ``topics.json``: the app's own generation loop
(``app.generation.side_by_side``) with the app's defaults (prompt, temperature, 150 new tokens),
over ``--tries`` seeds; a try succeeds when the preset's regex matches the steered story (and
the unsteered column shows how often the topic comes up anyway). Prints one table.

    python benchmarks/bench_preset_chips.py --model default --tries 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from app.generation import continuation_text, side_by_side
    from app.models import LoadedModel
    from app.tabs.steer import DEFAULT_PROMPT
    from codebook import CodebookModel, hub
    from codebook.analysis.regex import compile_regex
    from codebook.analysis.topics import preset_steering
    from codebook.text import encode_document

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.8, help="the app's default")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    directory = hub.resolve_model_dir(args.model)
    model = CodebookModel.from_pretrained(directory).eval()
    loaded = LoadedModel(args.model, model, directory)  # the app's presets, as it reads them
    presets = loaded.topics
    prompt_ids = encode_document(model.tokenizer, DEFAULT_PROMPT)
    print(f"{args.model}: prompt {DEFAULT_PROMPT!r}, temperature {args.temperature}, "
          f"{args.max_new_tokens} new tokens, seeds 0..{args.tries - 1}\n")
    print("| chip | steered | unsteered |\n|---|---:|---:|")
    totals = [0, 0]
    for name, preset in presets.items():
        regex = compile_regex(preset["regex"])
        steering = preset_steering(preset)
        hits = [0, 0]
        for seed in range(args.tries):
            *_, (plain, steered) = side_by_side(loaded, prompt_ids, steering, seed,
                                                args.temperature, args.max_new_tokens)
            hits[0] += bool(regex.search(continuation_text(loaded, prompt_ids, steered)))
            hits[1] += bool(regex.search(continuation_text(loaded, prompt_ids, plain)))
        totals = [totals[0] + hits[0], totals[1] + hits[1]]
        print(f"| {name} | {hits[0]}/{args.tries} | {hits[1]}/{args.tries} |", flush=True)
    n = args.tries * len(presets)
    print(f"| **all** | {totals[0]}/{n} ({100 * totals[0] / n:.0f}%) | "
          f"{totals[1]}/{n} ({100 * totals[1] / n:.0f}%) |")


if __name__ == "__main__":
    main()
