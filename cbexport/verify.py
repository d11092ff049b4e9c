"""Does an exported bundle compute what the torch model computes?

The reference is the real :class:`~codebook.modeling.CodebookModel` in eager mode, driven the way
a user drives it (its own forward with a ``DynamicCache``, ``model.steer`` and ``model.generate``
with a :class:`~codebook.steering.Steering`), not the wrapper the exporters capture, so the checks
also cover the wrapper, the ONNX function body and the runtime's steering arrays. It runs with the
attention implementation the exporters capture (see :func:`cbexport.decoder.eager_attention`).

Checks (fp32, tolerance :data:`TOLERANCE` on logits):

* logits of a prefill and of one cached decode step, batch 2 with one left-padded row, with and
  without steering, for every exported format;
* (``full``) the same on more random prompts, 64 greedy tokens from torch ``generate`` and from
  the ONNX runtime, and steered greedy generation (positions ``all`` and ``generated``).

Near-ties. A top-k is discontinuous: when two codes score within rounding error of each other at
the boundary of the top k, torch and onnxruntime (whose kernels round differently) may pick
different ones, and everything downstream legitimately differs. A check that misses its tolerance
therefore looks for the first site, in execution order, where the exported model selected other
codes than torch; it passes only if torch's own scores there were a near-tie (relative gap between
the k-th and (k+1)-th best code below :data:`TIE_TOLERANCE`), and the report says so. Differing
logits with identical codes, or a code difference without a near-tie, fail. A greedy divergence is
replayed step by step (teacher-forced with torch's tokens) and judged the same way, or as a
near-tie between the two best tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from transformers import DynamicCache

from cbexport import manifest as mf
from cbexport.decoder import eager_attention
from cbexport.runtime import CodebookRuntime
from cbexport.steer import topic_spec
from cbexport.torchscript_export import load_torchscript
from codebook.configuration import SITES
from codebook.layer import current_runs
from codebook.modeling import CodebookModel
from codebook.ops import SIMILARITIES
from codebook.steering_spec import Steering, steering_arrays, steers

TOLERANCE = 1e-4
TIE_TOLERANCE = 1e-5
GREEDY_TOKENS = 64


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, **self.detail}


@dataclasses.dataclass
class Step:
    """One forward call of either side."""

    logits: np.ndarray  # [batch, seq, vocab]
    codes: dict  # (layer, site) -> selected codes [batch, seq, groups, k]
    margins: dict | None = None  # torch only: relative top-k boundary gap [batch, seq, groups]
    blocked: dict = dataclasses.field(default_factory=dict)  # (layer, site) -> [groups, codes]
    real: np.ndarray | None = None  # [batch, seq] positions that are not padding


def verification_steering(manifest: dict, topics: dict) -> Steering:
    """The steering the checks use: the first topic preset, else two fixed codes at the first
    and last codebook sites with strength 2 (so that ``scale`` is exercised too)."""
    if topics:
        return topic_spec(topics, sorted(topics)[0])
    sites = manifest["sites"]
    first, last = sites[0], sites[-1]
    return Steering(codes=[f"{first['layer']}:{first['site']}:0:1",
                           f"{last['layer']}:{last['site']}:0:2"], strength=2.0)


def _random_batch(vocab: int, seed: int, lengths=(7, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts: ``(ids, attention_mask)``."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(0, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


# -- the two sides ------------------------------------------------------------------------------

class _Eager:
    """The torch reference: the model's own forward with a ``DynamicCache``; besides the codes it
    records how close each top-k choice was (for judging near-ties)."""

    def __init__(self, model: CodebookModel):
        self.model = model
        self.layers = model.codebook_layers()

    def empty_cache(self, batch: int):
        return DynamicCache()

    @torch.no_grad()
    def __call__(self, ids, mask, positions, cache, spec: Steering | None):
        margins: dict = {}
        handles = [layer.register_forward_hook(functools.partial(_record_margin, key, margins))
                   for key, layer in self.layers.items()]
        try:
            with self.model.steer(spec), self.model.capture_codes() as codes:
                out = self.model(input_ids=torch.from_numpy(ids),
                                 attention_mask=torch.from_numpy(mask),
                                 position_ids=torch.from_numpy(positions), cache=cache,
                                 use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        selected = {key: codes[key][0].numpy() for key in self.layers}
        return Step(out.logits.float().numpy(), selected, margins), cache


def _record_margin(key, margins: dict, layer, args, output) -> None:
    """Relative gap between the k-th and (k+1)-th best scores of each group's choice."""
    x = args[0]
    h = layer.normalize(x.reshape(*x.shape[:-1], layer.groups, layer.dim))
    flat = h.reshape(-1, layer.groups, layer.dim)
    scores = SIMILARITIES[layer.similarity].scores(flat, layer.codebook.to(flat.dtype))
    run = current_runs().get(layer)  # the steering _Eager applies (positions "all")
    if run is not None and run.steering is not None:
        scores = scores + run.steering.bias
    if layer.k == layer.num_codes:
        gap = torch.full(scores.shape[:-1], float("inf"))
    else:
        top = scores.topk(layer.k + 1, dim=-1).values
        gap = (top[..., -2] - top[..., -1]) / top[..., -2].abs().clamp_min(1.0)
        gap = torch.nan_to_num(gap, nan=float("inf"))  # forced or blocked on both sides
    margins[key] = gap.reshape(*x.shape[:-1], layer.groups).numpy()


class _Onnx:
    def __init__(self, runtime: CodebookRuntime):
        self.runtime = runtime

    def empty_cache(self, batch: int):
        return self.runtime.empty_cache(batch)

    def __call__(self, ids, mask, positions, cache, spec: Steering | None):
        arrays = steering_arrays(self.runtime.sites, spec) if spec else None
        logits, cache, codes = self.runtime.forward(ids, mask, positions, cache, arrays)
        return Step(logits, codes), cache


class _TorchScript:
    """The traced decoder, fed flat tensors in the manifest's order."""

    def __init__(self, bundle, manifest: dict):
        self.module = load_torchscript(bundle)
        self.manifest = manifest
        self.keys = [(s["layer"], s["site"]) for s in manifest["sites"]]

    def empty_cache(self, batch: int):
        model = self.manifest["model"]
        shape = (batch, model["kv_heads"], 0, model["head_dim"])
        return [torch.zeros(shape) for _ in range(2 * model["num_layers"])]

    @torch.no_grad()
    def __call__(self, ids, mask, positions, cache, spec: Steering | None):
        arrays = steering_arrays(self.manifest["sites"], spec) if spec else {}
        steer = []
        for site in self.manifest["sites"]:
            key, shape = (site["layer"], site["site"]), (site["groups"], site["num_codes"])
            bias, scale = arrays.get(key, (np.zeros(shape, np.float32),
                                           np.ones(shape, np.float32)))
            steer += [torch.from_numpy(bias), torch.from_numpy(scale)]
        outs = self.module(torch.from_numpy(ids), torch.from_numpy(mask),
                           torch.from_numpy(positions), *cache, *steer)
        n_kv = 2 * self.manifest["model"]["num_layers"]
        codes = {key: t.numpy() for key, t in zip(self.keys, outs[1 + n_kv:], strict=True)}
        return Step(outs[0].numpy(), codes), list(outs[1:1 + n_kv])


# -- judging ------------------------------------------------------------------------------------

def _selection(codes: np.ndarray, num_codes: int, blocked: np.ndarray | None) -> np.ndarray:
    """``[..., groups, k]`` ids -> ``[..., groups, num_codes]`` bool, blocked codes dropped
    (they fill top-k slots without being used, in any order)."""
    onehot = np.zeros((*codes.shape[:-1], num_codes), bool)
    np.put_along_axis(onehot, codes, True, axis=-1)
    return onehot if blocked is None else onehot & ~blocked


def first_code_difference(ref: list[Step], got: list[Step], sites: list[dict]) -> dict | None:
    """The first site (over the steps, in execution order) where the exported model selected
    other codes than torch on a real token, and whether torch's choice there was a near-tie."""
    order = sorted(sites, key=lambda s: (s["layer"], SITES.index(s["site"])))
    for index, (r, g) in enumerate(zip(ref, got, strict=True)):
        for site in order:
            key = (site["layer"], site["site"])
            blocked = r.blocked.get(key)
            differ = (_selection(r.codes[key], site["num_codes"], blocked)
                      != _selection(g.codes[key], site["num_codes"], blocked)).any(-1)
            differ &= r.real[..., None]
            if differ.any():
                margin = float(r.margins[key][differ].max())
                return {"step": index, "site": f"{key[0]}:{key[1]}",
                        "groups_differing": int(differ.sum()), "torch_margin": margin,
                        "near_tie": margin <= TIE_TOLERANCE}
    return None


def _run_both(eager, exported, ids, mask, tokens: np.ndarray, spec: Steering | None,
              sites: list[dict]) -> tuple[list[Step], list[Step]]:
    """Prefill ``ids`` then decode ``tokens`` (teacher-forced, ``[batch, steps]``) on both sides.
    Steering follows ``spec.positions``: prompt step, decode steps, or both."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    caches = [eager.empty_cache(len(ids)), exported.empty_cache(len(ids))]
    all_positions = dataclasses.replace(spec, positions="all") if spec else None
    ref, got = [], []
    for step in range(tokens.shape[1] + 1):
        if step:
            ids = tokens[:, step - 1:step]
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        steer = all_positions if spec and steers(spec.positions, in_prompt=not step) else None
        r, caches[0] = eager(ids, mask, positions, caches[0], steer)
        g, caches[1] = exported(ids, mask, positions, caches[1], steer)
        r.real = mask[:, -ids.shape[1]:].astype(bool)
        arrays = steering_arrays(sites, steer) if steer else {}
        r.blocked = {key: np.isneginf(bias) for key, (bias, _) in arrays.items()}
        ref.append(r)
        got.append(g)
    return ref, got


def compare_logits(eager: _Eager, exported: dict, manifest: dict, spec: Steering,
                   seeds: list[int]) -> list[Check]:
    """Prefill and decode logits of each exported format against eager, with and without
    steering (on all positions: each step here is checked on its own)."""
    spec = dataclasses.replace(spec, positions="all")
    vocab = manifest["model"]["vocab_size"]
    checks = []
    for seed in seeds:
        ids, mask = _random_batch(vocab, seed)
        next_tokens = np.random.default_rng(seed + 1).integers(0, vocab, (len(ids), 1))
        for steer in (None, spec):
            for fmt, step in exported.items():
                ref, got = _run_both(eager, step, ids, mask, next_tokens, steer, manifest["sites"])
                for index, phase in enumerate(("prefill", "decode")):
                    r, g = ref[index], got[index]
                    diff = float(np.abs(r.logits - g.logits)[r.real].max())
                    detail = {"max_abs_diff": diff, "batch": len(ids), "tolerance": TOLERANCE}
                    passed = diff <= TOLERANCE
                    if not passed:
                        cause = first_code_difference(ref[:index + 1], got[:index + 1],
                                                      manifest["sites"])
                        detail["code_difference"] = cause
                        passed = bool(cause and cause["near_tie"])
                    name = f"{fmt} {phase} logits{' steered' if steer else ''} (seed {seed})"
                    checks.append(Check(name, passed, detail))
    return checks


@torch.no_grad()
def torch_generate(model: CodebookModel, prompts: list[list[int]], max_new_tokens: int,
                   pad_id: int, steering: Steering | None = None) -> list[list[int]]:
    """Greedy continuation by ``model.generate`` (left-padded batch, end-of-text ignored)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(ids, attention_mask=mask, steering=steering, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad_id)
    return out[:, width:].tolist()


def _explain_divergence(eager: _Eager, runtime: CodebookRuntime, prompts, want, got,
                        spec: Steering | None) -> dict:
    """Replay torch's tokens on both sides up to the first differing token and say why."""
    want, got = np.array(want), np.array(got)
    step = int(np.flatnonzero((want != got).any(0))[0])
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), runtime.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    ref, out = _run_both(eager, _Onnx(runtime), ids, mask, want[:, :step], spec, runtime.sites)
    cause = first_code_difference(ref, out, runtime.sites)
    if cause is None:  # same codes all along: the two best tokens must be (nearly) tied
        rows = np.flatnonzero(want[:, step] != got[:, step])
        logits = ref[-1].logits[rows, -1]
        gap = float((logits[np.arange(len(rows)), want[rows, step]]
                     - logits[np.arange(len(rows)), got[rows, step]]).max())
        cause = {"token_logit_gap": gap, "near_tie": gap <= 2 * TOLERANCE}
    return {"first_differing_token": step, **cause}


def compare_generation(eager: _Eager, runtime: CodebookRuntime, spec: Steering,
                       seed: int = 0) -> list[Check]:
    """Greedy tokens from torch and from the ONNX runtime, unsteered and steered."""
    vocab = runtime.manifest["model"]["vocab_size"]
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (6, 4)]
    checks, plain = [], None
    cases = [("unsteered", None), ("steered", spec),
             ("steered, generated positions", dataclasses.replace(spec, positions="generated"))]
    for label, case in cases:
        want = torch_generate(eager.model, prompts, GREEDY_TOKENS, runtime.pad_id, case)
        got = runtime.generate(prompts, GREEDY_TOKENS, steering=case, stop_at_eos=False)
        pairs = zip(want, got, strict=True)
        same = sum(a == b for w, g in pairs for a, b in zip(w, g, strict=False))
        detail = {"tokens": GREEDY_TOKENS, "batch": len(prompts),
                  "identical_tokens": same, "total_tokens": GREEDY_TOKENS * len(prompts)}
        if case is None:
            plain = want
        else:
            # A steering check is only meaningful if steering changed what torch generates.
            detail["steering_changed_output"] = want != plain
        passed = want == got
        if not passed:
            detail["divergence"] = _explain_divergence(eager, runtime, prompts, want, got, case)
            passed = detail["divergence"]["near_tie"]
        checks.append(Check(f"onnx greedy generation {label}", passed, detail))
    return checks


def verify_bundle(model: CodebookModel, bundle, formats: list[str], full: bool = False) -> dict:
    """Run the checks on ``bundle`` (a directory, possibly not yet in its final place)."""
    manifest = mf.read_manifest(bundle, need=tuple(formats))
    runtime = CodebookRuntime(bundle, provider="cpu") if "onnx" in formats else None
    topics = runtime.topics if runtime else {}
    spec = verification_steering(manifest, topics)
    exported = {}
    if runtime:
        exported["onnx"] = _Onnx(runtime)
    if "torchscript" in formats:
        exported["torchscript"] = _TorchScript(bundle, manifest)
    eager = _Eager(model)
    with eager_attention(model):
        checks = compare_logits(eager, exported, manifest, spec,
                                seeds=[0, 1, 2] if full else [0])
        if full and runtime:
            checks += compare_generation(eager, runtime, spec)
    return {
        "full": full,
        "tolerance": TOLERANCE,
        "tie_tolerance": TIE_TOLERANCE,
        "steering": {"codes": [str(c) for c in spec.codes], "strength": spec.strength,
                     "mode": spec.mode},
        "checks": [c.to_dict() for c in checks],
        # Over the checks that agree code for code; near-tie flips are counted apart.
        "max_abs_diff": max((c.detail["max_abs_diff"] for c in checks
                             if "max_abs_diff" in c.detail and "code_difference" not in c.detail),
                            default=None),
        "near_ties": sum(1 for c in checks
                         if "code_difference" in c.detail or "divergence" in c.detail),
        "passed": all(c.passed for c in checks),
    }
