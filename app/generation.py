"""Unsteered and steered continuations of one prompt, stepped side by side.

Both continuations are sampled token by token in one loop, each with its own KV cache and its own
random generator seeded with the same seed, so the only difference between them is the steering
(and the unsteered one is what the model writes alone with that seed). Sampling is the paper's
protocol, as in :func:`codebook.analysis.steer_eval.sample`: pure sampling at ``temperature`` (no
top-k or
top-p), or greedy at temperature 0; a continuation ends at the first end-of-story token.

Concurrent generations share one batched forward per step (:mod:`app.batching`), each row with
its own steering; this module's own loop, one forward per side, runs where they cannot: on a
ZeroGPU Space (whose GPU is attached only inside the visitor's call) and for models whose KV caches
the batch cannot hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache

from app.models import LoadedModel
from codebook.ops import prepared_codebooks
from codebook.steering import Steering
from codebook.text import stop_ids


@dataclasses.dataclass
class _Side:
    steering: Steering | None
    generator: torch.Generator
    cache: DynamicCache
    next_input: torch.Tensor
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False


def draw_noise(temperatures: Sequence[float], generators: Sequence[torch.Generator],
               vocab: int) -> torch.Tensor | None:
    """The ``Exp(1)`` noise :func:`sample_tokens` divides by: ``[sampled rows, vocab]``, one row
    for every row with a temperature other than 0, drawn from that row's generator (``None`` when
    every row is greedy). Drawn apart from the sampling so that a caller can draw it while the
    model computes the logits (:mod:`app.batching` does, in another thread): the draws do not
    depend on the logits, and each generator gives the same numbers whenever it is asked."""
    sampled = [i for i, t in enumerate(temperatures) if t != 0]
    if not sampled:
        return None
    noise = torch.empty(len(sampled), vocab)
    for q, i in zip(noise, sampled, strict=True):
        q.exponential_(generator=generators[i])
    return noise


def sample_tokens(logits: torch.Tensor, temperatures: Sequence[float],
                  generators: Sequence[torch.Generator],
                  noise: torch.Tensor | None = None) -> list[int]:
    """The next token of every row of ``logits`` ``[rows, vocab]``, each row with its own
    temperature (0: greedy) and random generator.

    A row samples what ``torch.multinomial(softmax(logits / temperature), 1, generator=g)`` gives
    it alone (so what the library's ``generate`` samples for one row with that seed, the CLI
    protocol), and takes the same draws from its generator, whatever the other rows: torch's
    multinomial draws one sample as ``argmax(probs / q)`` with ``q`` from ``Exp(1)``, and so does
    this, but with each row's ``q`` drawn from that row's generator and the rest computed for all
    rows at once (one softmax, one division, one argmax over the batch: each row's arithmetic is
    the same as alone). On the CPU, so that a seed gives the same text on every device.
    ``noise`` is :func:`draw_noise`'s for these rows when drawn beforehand (else drawn here).
    """
    logits = logits.detach().float().cpu()
    sampled = [i for i, t in enumerate(temperatures) if t != 0]
    if len(sampled) < len(temperatures):
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = [0] * len(sampled)  # every one sampled below
    if not sampled:
        return tokens
    rows = torch.tensor(sampled)
    temps = torch.tensor([float(temperatures[i]) for i in sampled])[:, None]
    probs = torch.softmax((logits if len(sampled) == len(tokens) else logits[rows]) / temps,
                          dim=-1)
    if not bool(((probs >= 0) & (probs < math.inf)).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if noise is None:
        noise = draw_noise(temperatures, generators, probs.shape[-1])
    if noise.shape != probs.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} for probabilities of shape "
                         f"{tuple(probs.shape)}")
    for i, token in zip(sampled, probs.div_(noise).argmax(-1).tolist(), strict=True):
        tokens[i] = token
    return tokens


@torch.no_grad()
def side_by_side(
    loaded: LoadedModel, prompt_ids: list[int], steering: Steering | None, seed: int,
    temperature: float, max_new_tokens: int,
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(unsteered tokens, steered tokens)`` after every step (the prompt excluded; an
    end-of-story token ends a side and is not included)."""
    from app import batching, gpu

    if gpu.spaces is None and batching.batcher(loaded) is not None:
        yield from batching.side_by_side(loaded, prompt_ids, steering, seed, temperature,
                                         max_new_tokens)
        return
    model = loaded.model
    stops = set(stop_ids(loaded.tokenizer))
    prompt = torch.tensor([prompt_ids], device=model.device)
    # Without steering both columns would be the same text: compute it once.
    sides = [
        _Side(s, torch.Generator().manual_seed(seed), DynamicCache(), prompt)
        for s in ((None, steering) if steering is not None else (None,))
    ]
    prepared: dict = {}  # the codebooks, prepared once for every step (codebook.ops)
    for _ in range(max_new_tokens):
        for side in sides:
            if side.done:
                continue
            with (prepared_codebooks(prepared),
                  model.steer(side.steering, prompt_length=len(prompt_ids))):
                logits = model(input_ids=side.next_input, cache=side.cache,
                               use_cache=True).logits[0, -1]
            token = sample_tokens(logits[None], [temperature], [side.generator])[0]
            if token in stops:
                side.done = True
                continue
            side.tokens.append(token)
            side.next_input = torch.tensor([[token]], device=model.device)
        yield sides[0].tokens, sides[-1].tokens
        if all(side.done for side in sides):
            return


def continuation_text(loaded: LoadedModel, prompt_ids: list[int], tokens: list[int]) -> str:
    """The text ``tokens`` add after the prompt (decoded in context, so the leading space that a
    decoder strips at the start of a text is kept)."""
    tokenizer = loaded.tokenizer
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(tokens, skip_special_tokens=True)
