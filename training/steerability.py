"""How well topics steer: a measurement for choosing between codebook models.

For each topic word (e.g. "boat"): find, per codebook (attention head or MLP site), the code
with the best *precision* for the topic over a sample of text, the fraction of its activations
that fall in a story after the word's first mention (or, with ``scope="word"``, on the word's own
tokens); take the most precise codes; force them at every position while sampling stories from
a fixed prompt, and count the stories that mention the topic. The score of a topic is that rate
minus the unsteered rate, so a model whose codes do not carry topics scores about 0. Sampling is
seeded: the figures are repeatable.
"""

from __future__ import annotations

import re

import torch

from codebook import CodebookModel, CodeRef, Steering

TOPICS = ("boat", "rain", "cake", "fish", "flower", "bear", "frog", "book")
PROMPT = "Once upon a time"


def _topic_pattern(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word)}s?\b", re.IGNORECASE)


class CodeActivations:
    """The codes each token of ``documents`` chose at every site (one forward pass per
    document, done once for all topics), with the tokens' character spans."""

    @torch.no_grad()
    def __init__(self, model: CodebookModel, tokenizer, documents: list[str]):
        self.layers = model.codebook_layers()
        self.documents = documents
        self.spans: list[list[tuple[int, int]]] = []
        self.codes: list[dict] = []  # per document: {site: [seq, groups, k] global code ids}
        self.fired = {key: 0 for key in self.layers}  # activations per code, all documents
        bos = tokenizer.bos_token_id
        for doc in documents:
            encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            self.spans.append([(-1, -1), *encoded["offset_mapping"]])  # BOS spans nothing
            ids = torch.tensor([[bos, *encoded["input_ids"]]], device=model.device)
            with model.capture_codes() as captured:
                model(input_ids=ids)
            doc_codes = {}
            for key, parts in captured.items():
                layer = self.layers[key]
                offsets = torch.arange(layer.groups, device=ids.device)[:, None] * layer.num_codes
                flat = (parts[0][0] + offsets).cpu()  # ids unique across the site's codebooks
                doc_codes[key] = flat
                self.fired[key] = self.fired[key] + torch.bincount(
                    flat.reshape(-1), minlength=layer.groups * layer.num_codes)
            self.codes.append(doc_codes)

    def topic_codes(self, word: str, num_codes: int, min_count: int = 5,
                    scope: str = "context") -> list[tuple[CodeRef, float, int]]:
        """The ``num_codes`` most precise codes for ``word`` (at most one per codebook), as
        ``(code, precision, activations)``. ``scope``: a code is on topic when it fires on a
        token of the word (``"word"``) or anywhere in a story from the word's first mention on
        (``"context"``: topics live in the context more than in one word's tokens)."""
        pattern = _topic_pattern(word)
        hits = {key: 0 for key in self.layers}
        for doc, spans, doc_codes in zip(self.documents, self.spans, self.codes, strict=True):
            matches = [m.span() for m in pattern.finditer(doc)]
            if not matches:
                continue
            if scope == "word":
                on_topic = torch.tensor([any(s < end and start < e for s, e in matches)
                                         for start, end in spans])
            else:  # the story is about the topic from its first mention on
                on_topic = torch.tensor([end > matches[0][0] for _, end in spans])
            for key, flat in doc_codes.items():
                size = self.layers[key].groups * self.layers[key].num_codes
                hits[key] = hits[key] + torch.bincount(flat[on_topic].reshape(-1),
                                                       minlength=size)
        best = []
        for key, fired in self.fired.items():
            layer = self.layers[key]
            precision = (hits[key] / fired.clamp_min(1)).double()
            precision[fired < min_count] = 0
            values, codes = precision.view(layer.groups, layer.num_codes).max(1)
            for head in range(layer.groups):
                code = int(codes[head])
                count = int(fired[head * layer.num_codes + code])
                best.append((CodeRef(key[0], key[1], head, code), float(values[head]), count))
        best.sort(key=lambda item: (-item[1], -item[2]))
        return [item for item in best if item[1] > 0][:num_codes]


@torch.no_grad()
def topic_rate(model: CodebookModel, tokenizer, word: str, steering: Steering | None,
               samples: int, new_tokens: int, seed: int) -> float:
    """Fraction of ``samples`` stories sampled from :data:`PROMPT` that mention ``word``."""
    prompt = [tokenizer.bos_token_id, *tokenizer.encode(PROMPT, add_special_tokens=False)]
    ids = torch.tensor([prompt] * samples, device=model.device)
    torch.manual_seed(seed)
    out = model.generate(ids, steering=steering, max_new_tokens=new_tokens, do_sample=True,
                         temperature=1.0, top_k=0, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
    pattern = _topic_pattern(word)
    return sum(bool(pattern.search(text)) for text in texts) / samples


def steerability(model: CodebookModel, tokenizer, documents: list[str],
                 topics: tuple[str, ...] = TOPICS, codes_per_topic: int = 8,
                 samples: int = 32, new_tokens: int = 96, seed: int = 0,
                 mode: str = "add", strength: float = 1.0, scope: str = "context",
                 min_count: int = 20) -> dict:
    """Per topic: the codes used, the unsteered and steered rates; and the mean gain.
    ``mode`` and ``strength`` are those of :class:`~codebook.Steering`; ``scope`` and
    ``min_count`` (fewest activations a chosen code must have) those of
    :meth:`CodeActivations.topic_codes`."""
    model.eval()
    activations = CodeActivations(model, tokenizer, documents)
    results = {}
    for word in topics:
        found = activations.topic_codes(word, codes_per_topic, min_count, scope)
        steering = Steering(codes=[ref for ref, _, _ in found], mode=mode, strength=strength)
        results[word] = {
            "codes": [{"code": str(ref), "precision": p, "activations": n}
                      for ref, p, n in found],
            "unsteered": topic_rate(model, tokenizer, word, None, samples, new_tokens, seed),
            "steered": topic_rate(model, tokenizer, word, steering, samples, new_tokens, seed),
        }
    gains = [r["steered"] - r["unsteered"] for r in results.values()]
    return {"topics": results, "mean_gain": sum(gains) / len(gains), "samples": samples,
            "new_tokens": new_tokens, "codes_per_topic": codes_per_topic, "mode": mode,
            "strength": strength, "scope": scope}


def format_steerability(result: dict) -> str:
    lines = [f"{'topic':10} {'unsteered':>9} {'steered':>8}  best code (precision)"]
    for word, r in result["topics"].items():
        best = r["codes"][0] if r["codes"] else None
        best_text = f"{best['code']} ({best['precision']:.2f})" if best else "-"
        lines.append(f"{word:10} {r['unsteered']:9.0%} {r['steered']:8.0%}  {best_text}")
    lines.append(f"mean gain: {result['mean_gain']:+.1%} ({result['samples']} samples of "
                 f"{result['new_tokens']} tokens per topic; {result['codes_per_topic']} codes "
                 f"({result['scope']} scope) forced, mode {result['mode']}, strength "
                 f"{result['strength']:g})")
    return "\n".join(lines)
