"""Choosing how hard to steer a topic: a small grid of settings, measured by sampling.

Topic search ranks codes; which of them to force, how many and at what strength is a trade-off.
More codes and larger strengths move more stories to the topic but make the text less fluent, and
where the balance lies differs from topic to topic (on the default model one topic may need a
handful of codes at strength 4, another two dozen at strength 1.5). Where to steer matters too:
within the fluency limit on the default model, codes of the last layer alone moved 55% of
calibration stories to "fire" and 50% to "flower", codes from all layers 5% and 25%, while
"friend" steered best from all layers (95% against 60%). So the setting is measured, not
guessed: for every ``(layers, number of codes, strength, mode)`` of the grid, where ``layers``
keeps only codes of the model's last ``n`` codebook layers (``None``: all), sample the paper's
prompts on a *calibration* seed, and keep the setting with the highest steered rate whose fluency
ratio stays within ``max_fluency``. Report the chosen setting's figures from
:func:`~codebook.analysis.steer_eval.steer_eval` on a different seed: the calibration seed's
figures are
optimistic, being the best of several tries.

The mode matters too. With each preset's codes and strength (seed 0, 40 samples), ``replace``
(the forced codes are a steered head's whole output) moved 57.5% of stories to "flower" against
27.5% for ``add`` (they join the head's own top-k), while "dragon" and "baby" fell from 12.5% and
17.5% to 2.5% and 7.5%. Both modes are tried by default. On the default model's seven topics
the two-mode grid averaged 33.9% against 35.7% for ``add`` alone (baby won with ``replace`` on
the calibration seed, then steered 5% on the evaluation seed), so its presets were made with
``modes=("add",)``.

The baseline (unsteered) samples are drawn once and shared by all settings.
"""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from codebook.analysis.index import Layout
from codebook.analysis.regex import compile_regex
from codebook.analysis.search import CodeScore, select_codes
from codebook.analysis.search import last_layers as layers_of
from codebook.analysis.steer_eval import (
    PAPER_PROMPTS,
    check_sampling,
    fluency_ratio,
    sample_prompts,
    summarize,
)
from codebook.steering import Steering

LAST_LAYERS = (1, 2, None)
NUM_CODES = (6, 12, 24)
STRENGTHS = (1.5, 2.0, 2.5, 3.0, 4.0)
MODES = ("add", "replace")
PER_HEAD = 4
# Below the target of 1.3 for the noise of a small sample: on the default model a setting at
# 1.24 on the calibration seed measured 1.33 on another.
MAX_FLUENCY = 1.2
CALIBRATION_SEED = 1


@dataclasses.dataclass
class Calibration:
    """The chosen steering and every setting tried, with what it measured."""

    steering: Steering
    trials: list[dict]
    chosen: int  # index into trials
    baseline_rate: float
    settings: dict  # the grid and sampling settings, for the record

    def to_dict(self) -> dict:
        return {**self.settings, "baseline_rate": self.baseline_rate, "chosen": self.chosen,
                "trials": self.trials}


def calibrate(
    model, ranked: list[CodeScore], regex: str, num_codes=NUM_CODES, strengths=STRENGTHS,
    last_layers=LAST_LAYERS, per_head: int = PER_HEAD, modes=MODES,
    max_fluency: float = MAX_FLUENCY, prompts=PAPER_PROMPTS, samples_per_prompt: int = 5,
    max_new_tokens: int = 200, temperature: float = 1.0, seed: int = CALIBRATION_SEED,
    progress: bool = True,
) -> Calibration:
    """The best grid setting for a topic (see the module docstring). ``ranked`` is a topic
    search's codes, best first; each setting forces the first ``n`` of them, among those of its
    layers, that :func:`~codebook.analysis.search.select_codes` allows at ``per_head`` codes per
    head.
    When no setting keeps fluency within ``max_fluency``, the most fluent one is chosen."""
    check_sampling(model, prompts, samples_per_prompt, max_new_tokens, temperature)
    if not num_codes or not strengths or not last_layers or not modes:
        raise ValueError("the calibration grid needs at least one number of codes, strength, "
                         "set of layers and mode")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown steering modes {unknown}; modes: {list(MODES)}")
    if max_fluency <= 1:
        raise ValueError(f"max_fluency must be above 1 (a ratio of losses), got {max_fluency}")
    pattern = compile_regex(regex)
    layout = Layout.of_model(model)
    layer_sets = []
    for last in last_layers:
        layers = layers_of(layout, last)
        if layers not in layer_sets:
            layer_sets.append(layers)
    if not any(score.ref.layer in layers for layers in layer_sets for score in ranked):
        raise ValueError(f"no ranked code lies in the calibration's layers ({layer_sets}): "
                         "topic search found no code to steer with")
    settings = [(layers, n, float(s), mode) for mode in dict.fromkeys(modes)
                for layers in layer_sets for n in sorted(set(num_codes))
                for s in sorted(set(strengths))]
    sampling = dict(prompts=prompts, samples_per_prompt=samples_per_prompt,
                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    trials, tried = [], set()
    with tqdm(total=len(prompts) * (1 + len(settings)), desc=f"calibrate /{regex}/",
              unit="batch", disable=not progress) as bar:
        baseline = summarize(sample_prompts(model, None, bar=bar, **sampling), pattern, prompts)
        for layers, n, strength, mode in settings:
            candidates = [score for score in ranked if score.ref.layer in layers]
            if not candidates:
                bar.update(len(prompts))
                continue
            codes = select_codes(candidates, layout, n, per_head)
            if (tuple(codes), strength, mode) in tried:  # e.g. the best codes all in one layer
                bar.update(len(prompts))
                continue
            tried.add((tuple(codes), strength, mode))
            steering = Steering(codes, strength=strength, mode=mode)
            steered = summarize(sample_prompts(model, steering, bar=bar, **sampling), pattern,
                                prompts)
            trials.append({"layers": layers, "num_codes": len(codes), "strength": strength,
                           "mode": mode, "rate": steered["rate"],
                           "fluency_ratio": fluency_ratio(steered, baseline),
                           "distinct_2": steered["distinct_2"], "steering": steering})
    fluent = [i for i, t in enumerate(trials)
              if t["fluency_ratio"] is not None and t["fluency_ratio"] <= max_fluency]
    if fluent:  # the highest rate; among equal rates, the most fluent
        chosen = max(fluent, key=lambda i: (trials[i]["rate"], -trials[i]["fluency_ratio"]))
    else:
        chosen = min(range(len(trials)),
                     key=lambda i: trials[i]["fluency_ratio"] or float("inf"))
    steering = trials[chosen]["steering"]
    for trial in trials:
        del trial["steering"]
    record = {"last_layers_grid": list(last_layers), "num_codes_grid": list(num_codes),
              "strength_grid": [float(s) for s in strengths],
              "per_head": per_head, "mode_grid": list(dict.fromkeys(modes)),
              "max_fluency": max_fluency,
              "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed, "prompts": list(prompts),
              "fluency_met": bool(fluent)}
    return Calibration(steering, trials, chosen, baseline["rate"], record)
