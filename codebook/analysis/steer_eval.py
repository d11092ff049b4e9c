"""Steering evaluation, following the paper's TinyStories protocol.

For each prompt of :data:`PAPER_PROMPTS` (the empty prompt is the document separator alone), draw
``samples_per_prompt`` continuations of up to ``max_new_tokens`` tokens by pure sampling at
``temperature`` (no top-k or top-p), once with the steering and once without (the baseline). A
sample succeeds when the topic regex (case-insensitive) matches its continuation. Both runs use the
same seed per prompt, so the only difference between them is the steering.

A continuation ends at the first end-of-story token (EOS, or the document separator with which
llama2.c-style models start the next story): text after it belongs to another story.

Also reported, for the steered and the baseline samples:

* ``loss``: mean per-token negative log-likelihood of the continuations (their end-of-story token
  included) under the model with steering off; ``fluency_ratio`` = steered / baseline;
* ``distinct_2``: per sample, distinct word bigrams / word bigrams, averaged over samples;
* ``mean_length``: mean continuation length in tokens.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from codebook.analysis.regex import Regex, compile_regex
from codebook.steering import Steering
from codebook.text import encode_document, stop_ids

PAPER_PROMPTS = ("", "Once upon a time,", "Once there was a", "A long time ago,")

_WORD = re.compile(r"\w+|[^\w\s]")


@torch.no_grad()
def sample(
    model, prompt_ids: list[int], num_samples: int, max_new_tokens: int, temperature: float,
    seed: int, steering: Steering | None = None,
) -> list[list[int]]:
    """``num_samples`` continuations of one prompt (token ids, cut before the end of the story)."""
    stops = stop_ids(model.tokenizer)
    ids = torch.tensor([prompt_ids] * num_samples, device=model.device)
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), steering=steering, do_sample=True,
        temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=stops, pad_token_id=stops[0],
    )
    continuations = []
    for row in out[:, len(prompt_ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        # Keep the end-of-story token: it is a generated token whose loss counts.
        continuations.append(row if end is None else row[:end + 1])
    return continuations


@torch.no_grad()
def continuation_loss(model, prompt_ids: list[int], continuations: list[list[int]]) -> tuple:
    """``(summed NLL, token count)`` of the continuations after the prompt, steering off."""
    rows = [prompt_ids + c for c in continuations if c]
    if not rows:
        return 0.0, 0
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    with model.steer(None):
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device),
                          reduction="none").cpu()
    # Targets from the first continuation token on, and only real (unpadded) ones.
    targets = mask[:, 1:].bool()
    targets[:, :len(prompt_ids) - 1] = False
    return float(nll[targets].sum()), int(targets.sum())


def continuation_text(tokenizer, prompt_ids: list[int], continuation: list[int]) -> str:
    """The text ``continuation`` adds to the prompt (decoded together, so a leading space that
    decoding a sequence alone would strip is kept)."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return tokenizer.decode(prompt_ids + continuation, skip_special_tokens=True)[len(prompt):]


def distinct_2(text: str) -> float | None:
    """Distinct word bigrams / word bigrams of ``text`` (``None`` under two words)."""
    words = _WORD.findall(text.lower())
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def sample_prompts(
    model, steering: Steering | None, prompts=PAPER_PROMPTS, samples_per_prompt: int = 10,
    max_new_tokens: int = 200, temperature: float = 1.0, seed: int = 0, bar=None,
) -> dict:
    """Samples for every prompt (seed ``seed * 1000 + prompt number``) and their loss with
    steering off: ``{"texts", "prompt", "lengths", "nll", "tokens"}``, one entry per sample in
    ``texts``, ``prompt`` and ``lengths``. ``bar`` (a tqdm bar) advances once per prompt."""
    run = {"texts": [], "prompt": [], "lengths": [], "nll": 0.0, "tokens": 0}
    for p, prompt in enumerate(prompts):
        prompt_ids = encode_document(model.tokenizer, prompt)
        continuations = sample(model, prompt_ids, samples_per_prompt, max_new_tokens,
                               temperature, seed * 1000 + p, steering)
        nll, tokens = continuation_loss(model, prompt_ids, continuations)
        run["texts"] += [continuation_text(model.tokenizer, prompt_ids, c) for c in continuations]
        run["prompt"] += [prompt] * len(continuations)
        run["lengths"] += [len(c) for c in continuations]
        run["nll"] += nll
        run["tokens"] += tokens
        if bar is not None:
            bar.update()
    return run


def merge_runs(first: dict, second: dict) -> dict:
    """Two :func:`sample_prompts` runs as one (e.g. the same setting on two seeds)."""
    return {"texts": first["texts"] + second["texts"], "prompt": first["prompt"] + second["prompt"],
            "lengths": first["lengths"] + second["lengths"], "nll": first["nll"] + second["nll"],
            "tokens": first["tokens"] + second["tokens"]}


def summarize(run: dict, regex: Regex, prompts, keep_samples: bool = False) -> dict:
    """Success rate (overall and per prompt), loss, distinct-2 and length of a
    :func:`sample_prompts` run."""
    texts = run["texts"]
    success = [bool(regex.search(t)) for t in texts]
    diversity = [d for d in map(distinct_2, texts) if d is not None]
    summary = {
        "rate": sum(success) / len(texts),
        "loss": run["nll"] / run["tokens"] if run["tokens"] else None,
        "distinct_2": sum(diversity) / len(diversity) if diversity else None,
        "mean_length": sum(run["lengths"]) / len(run["lengths"]),
        "per_prompt": {},
    }
    for prompt in prompts:
        mine = [ok for ok, q in zip(success, run["prompt"], strict=True) if q == prompt]
        summary["per_prompt"][prompt] = sum(mine) / len(mine)
    if keep_samples:
        summary["samples"] = [{"prompt": q, "continuation": t}
                              for q, t in zip(run["prompt"], texts, strict=True)]
    return summary


def fluency_ratio(steered: dict, baseline: dict) -> float | None:
    """Steered over baseline loss (both under the model with steering off)."""
    if not baseline["loss"] or not steered["loss"]:
        return None
    return steered["loss"] / baseline["loss"]


def check_sampling(model, prompts, samples_per_prompt: int, max_new_tokens: int,
                   temperature: float) -> None:
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: steering evaluation needs one")
    if samples_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError("samples_per_prompt and max_new_tokens must be at least 1")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def steer_eval(
    model, steering: Steering, regex: str, prompts=PAPER_PROMPTS, samples_per_prompt: int = 10,
    max_new_tokens: int = 200, temperature: float = 1.0, seed: int = 0, progress: bool = True,
    keep_samples: bool = False,
) -> dict:
    """Steered and baseline success rates, fluency and diversity (see the module docstring)."""
    check_sampling(model, prompts, samples_per_prompt, max_new_tokens, temperature)
    pattern = compile_regex(regex)
    result = {
        "regex": regex,
        "steering": steering.to_dict(),
        "prompts": list(prompts),
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    with tqdm(total=2 * len(prompts), desc="steer-eval", unit="batch",
              disable=not progress) as bar:
        for name, run_steering in (("baseline", None), ("steered", steering)):
            run = sample_prompts(model, run_steering, prompts, samples_per_prompt,
                                 max_new_tokens, temperature, seed, bar)
            result[name] = summarize(run, pattern, prompts, keep_samples)
    result["fluency_ratio"] = fluency_ratio(result["steered"], result["baseline"])
    return result
