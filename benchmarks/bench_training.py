"""Training throughput with and without codebooks, side by side, in one run.

Each variant is a real ``training.trainer.finetune`` run (data order, code-usage tracking,
dead-code revival and logging included); its tokens/s is the median over the run's log windows,
the first (warm-up) window left out. Variants alternate over ``--rounds`` so that a machine
shared with other work slows them alike; the table gives each variant's best round.

    python benchmarks/bench_training.py                 # the default recipe (stories260K)
    python benchmarks/bench_training.py --device cuda   # adds a GPT-Neo-sized model (8 x 512)

Without ``../shared`` a random model of stories260K's shape and generated text stand in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from training.config import FinetuneConfig  # noqa: E402
from training.presets import PRESETS  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
DEFAULT = PRESETS["stories260k"]
CODEBOOK_OPTIONS = {"sites": DEFAULT["sites"], "num_codes": DEFAULT["num_codes"],
                    "k": DEFAULT["k"]}


def stand_in_material(root: Path) -> tuple[str, list[str]]:
    """A random Llama shaped like stories260K with a small tokenizer, and generated stories."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from test_training_support import make_tokenizer, write_stories
    from transformers import LlamaConfig, LlamaForCausalLM

    stories = write_stories(root / "stories.txt", 3000)
    tokenizer = make_tokenizer(stories.read_text().split("<|endoftext|>")[:500])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172,
                         num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    return str(root / "base"), [str(stories)]


def gpt_neo_material(root: Path, data: list[str]) -> str:
    """A random GPT-Neo of 8 layers x 512 (16 heads) with GPT-2's tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    gpt2 = SHARED / "tokenizers" / "gpt2"
    backend = ByteLevelBPETokenizer(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer,
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    config = GPTNeoConfig(vocab_size=50257, hidden_size=512, num_layers=8, num_heads=16,
                          attention_types=[[["global", "local"], 4]], max_position_embeddings=512)
    GPTNeoForCausalLM(config).save_pretrained(root / "neo", safe_serialization=True)
    tokenizer.save_pretrained(root / "neo")
    return str(root / "neo")


def tokens_per_second(config: FinetuneConfig) -> float:
    from training.trainer import finetune

    out = finetune(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    return statistics.median(windows[1:] or windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the variants")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if (SHARED / "models" / "stories260K" / "stories260K.bin").is_file():
            base, data, name = DEFAULT["base"].replace("../shared", str(SHARED)), [
                p.replace("../shared", str(SHARED)) for p in DEFAULT["data"]], "stories260K"
        else:
            base, data = stand_in_material(root)
            name = "stories260K-shaped (random)"
        models = [(name, base, DEFAULT["batch_size"])]
        if args.device == "cuda":
            models.append(("GPT-Neo 8x512 (random)", gpt_neo_material(root, data), 32))

        variants = [("none", {"codebooks": False})]
        variants.append((f"{'+'.join(DEFAULT['sites'])} C={DEFAULT['num_codes']} "
                         f"k={DEFAULT['k']}", CODEBOOK_OPTIONS))
        results: dict = {}
        runs = 0
        for _ in range(args.rounds):
            for model_name, model_base, batch in models:
                for label, options in variants:
                    runs += 1
                    config = FinetuneConfig(
                        base=model_base, data=data, output=str(root / f"run{runs}"),
                        block_size=DEFAULT["block_size"], batch_size=batch,
                        max_steps=args.steps, warmup_steps=10, log_every=10, eval_every=0,
                        checkpoint_every=0, val_fraction=0.005, device=args.device,
                        threads=args.threads, progress=False, **options)
                    speed = tokens_per_second(config)
                    results.setdefault((model_name, label), []).append(speed)
                    print(f"  {model_name} / {label}: {speed:,.0f} tokens/s", file=sys.stderr)

    print(f"\ntraining throughput on {args.device} ({args.threads} thread(s) per process, "
          f"block {DEFAULT['block_size']}, best of {args.rounds} rounds of {args.steps} steps)\n")
    print(f"{'model':30} {'codebooks':28} {'tokens/s':>10} {'vs. none':>9}")
    for model_name, _, _ in models:
        plain = max(results[(model_name, "none")])
        for label, _ in variants:
            best = max(results[(model_name, label)])
            change = "" if label == "none" else f"{best / plain - 1:+.0%}"
            print(f"{model_name:30} {label:28} {best:10,.0f} {change:>9}")


if __name__ == "__main__":
    main()
