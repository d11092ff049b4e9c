"""Evaluation of a (codebook) language model on held-out text.

Language-model figures: loss in nats per predicted token, **bits per byte** (the summed loss in
bits divided by the UTF-8 bytes of the documents' text, so models with different tokenizers are
comparable), and next-token accuracy. Every token of the stream after the first is predicted
exactly once (see :func:`training.data.eval_blocks`); the document separators are predicted too
(predicting where a story ends is part of modelling the text) but add no bytes.

Per codebook site: reconstruction MSE (per element), fraction of variance unexplained (squared
error over the variance of the site's input, per dimension, summed), dead-code fraction (codes
never chosen on this text: mean over the site's codebooks and the worst codebook) and code-usage
entropy in bits (mean over codebooks; the maximum is log2 of the number of codes).
For a codebook model the language-model figures are also given with the codebooks switched off.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from codebook import CodebookModel
from training.data import eval_blocks, tokenize


def site_name(key: tuple[int, str]) -> str:
    return f"{key[0]}:{key[1]}"


class _SiteStats:
    """Running sums for one codebook site."""

    def __init__(self, layer):
        g, d, c = layer.groups, layer.dim, layer.num_codes
        self.layer = layer
        self.count = 0
        self.sq_error = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(g, d, dtype=torch.float64)
        self.sum_sq = torch.zeros(g, d, dtype=torch.float64)
        self.usage = torch.zeros(g, c, dtype=torch.long)

    def hook(self, module, args, output):
        layer = self.layer
        h = layer.normalize(args[0].reshape(-1, layer.groups, layer.dim)).double()
        out = output.reshape(-1, layer.groups, layer.dim).double()
        self.count += h.shape[0]
        self.sq_error += (out - h).pow(2).sum().cpu()
        self.sum += h.sum(0).cpu()
        self.sum_sq += h.pow(2).sum(0).cpu()

    def add_codes(self, ids: Tensor) -> None:
        layer = self.layer
        offsets = torch.arange(layer.groups, device=ids.device)[:, None] * layer.num_codes
        flat = (ids.reshape(-1, layer.groups, layer.k) + offsets).reshape(-1)
        self.usage += torch.bincount(flat, minlength=self.usage.numel()).view_as(self.usage).cpu()

    def result(self) -> dict:
        layer = self.layer
        n = max(self.count, 1)
        variance = (self.sum_sq - self.sum.pow(2) / n).sum()
        dead = (self.usage == 0).double().mean(1)
        p = self.usage.double() / self.usage.sum(1, keepdim=True).clamp_min(1)
        entropy = -(p * p.clamp_min(1e-300).log2()).sum(1)
        return {
            "codebooks": layer.groups,
            "num_codes": layer.num_codes,
            "k": layer.k,
            "mse": float(self.sq_error / (n * layer.groups * layer.dim)),
            "fvu": float(self.sq_error / variance.clamp_min(1e-300)),
            "dead_fraction": float(dead.mean()),
            "dead_fraction_max": float(dead.max()),
            "usage_entropy_bits": float(entropy.mean()),
            "max_entropy_bits": math.log2(layer.num_codes),
        }


@torch.no_grad()
def language_model_metrics(
    model, blocks: list[Tensor], batch_size: int, num_bytes: int | None = None,
    on_batch=None, autocast_dtype: torch.dtype | None = None, progress: bool = False,
    desc: str = "evaluating",
) -> dict:
    """Summed next-token loss and accuracy over ``blocks`` (each ``[len + 1]``: inputs then
    shifted targets). ``on_batch`` is called after every forward pass."""
    device = next(model.parameters()).device
    by_length: dict[int, list[Tensor]] = {}
    for block in blocks:
        by_length.setdefault(block.numel(), []).append(block)
    batches = [torch.stack(same[i : i + batch_size])
               for same in by_length.values() for i in range(0, len(same), batch_size)]
    total_nll = torch.zeros((), dtype=torch.float64)
    correct = predicted = 0
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = model(input_ids=inputs).logits
        logits = logits.float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                     reduction="sum").double().cpu()
        correct += int((logits.argmax(-1) == targets).sum())
        predicted += targets.numel()
        if on_batch is not None:
            on_batch()
    loss = float(total_nll) / max(predicted, 1)
    metrics = {"loss": loss, "accuracy": correct / max(predicted, 1), "tokens": predicted}
    if num_bytes:
        metrics["bits_per_byte"] = float(total_nll) / math.log(2) / num_bytes
    return metrics


def evaluate(
    model, tokenizer, documents: list[str], block_size: int = 256, batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None, progress: bool = False,
) -> dict:
    """All figures (see the module docstring) for ``model`` on ``documents``."""
    stream = tokenize(documents, tokenizer)
    blocks = eval_blocks(stream.tokens, block_size)
    if not blocks:
        raise ValueError("the evaluation text is too short: it has fewer than 2 tokens")
    was_training = model.training
    model.eval()
    result = {"documents": stream.num_documents, "bytes": stream.num_bytes,
              "block_size": block_size}
    try:
        if isinstance(model, CodebookModel):
            result |= _with_codebooks(model, blocks, batch_size, stream.num_bytes,
                                      autocast_dtype, progress)
            with model.codebooks_disabled():
                result["without_codebooks"] = language_model_metrics(
                    model, blocks, batch_size, stream.num_bytes, None, autocast_dtype,
                    progress, desc="evaluating without codebooks")
        else:
            result |= language_model_metrics(model, blocks, batch_size, stream.num_bytes, None,
                                             autocast_dtype, progress)
    finally:
        model.train(was_training)
    return result


def _with_codebooks(model: CodebookModel, blocks, batch_size, num_bytes, autocast_dtype,
                    progress) -> dict:
    layers = model.codebook_layers()
    stats = {key: _SiteStats(layer) for key, layer in layers.items()}
    handles = [layers[key].register_forward_hook(s.hook) for key, s in stats.items()]
    try:
        with model.capture_codes() as captured:
            def drain():
                for key, ids in captured.items():
                    for part in ids:
                        stats[key].add_codes(part)
                    ids.clear()

            metrics = language_model_metrics(model, blocks, batch_size, num_bytes, drain,
                                             autocast_dtype, progress)
    finally:
        for handle in handles:
            handle.remove()
    metrics["sites"] = {site_name(key): s.result() for key, s in stats.items()}
    return metrics


def format_report(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    lines = [f"{result['documents']} documents, {result['bytes']} bytes, "
             f"{result['tokens']} predicted tokens (block size {result['block_size']})", ""]
    rows = [("with codebooks" if "sites" in result else "model", result)]
    if "without_codebooks" in result:
        rows.append(("without codebooks", result["without_codebooks"]))
    lines.append(f"{'':20} {'loss (nats/tok)':>16} {'bits/byte':>10} {'accuracy':>9}")
    for label, m in rows:
        lines.append(f"{label:20} {m['loss']:16.4f} {m['bits_per_byte']:10.4f} "
                     f"{m['accuracy']:9.4f}")
    if result.get("sites"):
        lines += ["", f"{'site':16} {'MSE':>10} {'FVU':>7} {'dead':>6} {'dead max':>9} "
                      f"{'entropy (bits)':>15}"]
        for name, s in result["sites"].items():
            lines.append(
                f"{name:16} {s['mse']:10.4g} {s['fvu']:7.3f} {s['dead_fraction']:6.1%} "
                f"{s['dead_fraction_max']:9.1%} "
                f"{s['usage_entropy_bits']:7.2f} / {s['max_entropy_bits']:.0f}"
            )
    return "\n".join(lines)
