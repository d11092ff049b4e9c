"""Benchmark: how well each topic-search statistic steers, side by side.

For every calibrated preset of a model (``topics.json`` made by ``python -m codebook presets``),
keep its layers, number of codes, per-head limit, strength and mode, but rank the codes by each
statistic of :mod:`codebook.analysis.search` (context, lead-in, document) over the same corpus; run
the
paper's steering evaluation for each and print steered rate and fluency ratio per topic and
statistic. The presets were calibrated for one statistic (recorded in their stats), which
favours it. Run (about 10 minutes on 2 CPU cores for the default model's seven topics):

    python benchmarks/bench_topic_statistics.py --data ../shared/data/tinystories/*V1*.txt ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook import CodebookModel, Steering, hub  # noqa: E402
from codebook.analysis.index import Layout, corpus_documents  # noqa: E402
from codebook.analysis.search import STATISTICS, TopicCounter, select_codes  # noqa: E402
from codebook.analysis.steer_eval import steer_eval  # noqa: E402
from codebook.analysis.topics import load_topics  # noqa: E402
from codebook.text import read_documents, token_surfaces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", nargs="+", required=True, help="text files for topic search")
    parser.add_argument("--samples-per-prompt", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = hub.resolve_model_dir(args.model)
    model = CodebookModel.from_pretrained(directory).eval()
    presets = {name: p for name, p in load_topics(directory).items()
               if "calibration" in p.get("stats", {})}
    if not presets:
        raise SystemExit(f"{args.model} has no calibrated presets (python -m codebook presets)")
    layout = Layout.of_model(model)
    counter = TopicCounter(layout, token_surfaces(model.tokenizer),
                           {name: p["regex"] for name, p in presets.items()})
    for tokens, flat in corpus_documents(model, read_documents(args.data)):
        counter.add(tokens, flat)
    rates = {statistic: [] for statistic in STATISTICS}
    print(f"| topic | setting | unsteered | {' | '.join(STATISTICS)} |")
    print(f"|---|---|---|{'---|' * len(STATISTICS)}")
    for name, preset in presets.items():
        calibration = preset["stats"]["calibration"]
        trial = calibration["trials"][calibration["chosen"]]
        cells, baseline = [], None
        for statistic in STATISTICS:
            ranked = [c for c in counter.result(name, statistic, top=layout.size).codes
                      if c.ref.layer in trial["layers"]]
            codes = select_codes(ranked, layout, trial["num_codes"], calibration["per_head"])
            result = steer_eval(model, Steering(codes, strength=preset["strength"],
                                                mode=preset["mode"]),
                                preset["regex"], samples_per_prompt=args.samples_per_prompt,
                                seed=args.seed, progress=False)
            baseline = result["baseline"]["rate"]
            rates[statistic].append(result["steered"]["rate"])
            cells.append(f"{result['steered']['rate']:.1%} ({result['fluency_ratio']:.2f}x)")
        setting = (f"{trial['num_codes']} codes, layers {trial['layers']}, "
                   f"x{preset['strength']:g}")
        print(f"| {name} | {setting} | {baseline:.1%} | {' | '.join(cells)} |", flush=True)
    means = " | ".join(f"{sum(r) / len(r):.1%}" for r in rates.values())
    print(f"| **mean** | | | {means} |")


if __name__ == "__main__":
    main()
