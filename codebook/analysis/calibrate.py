"""Choosing how hard to steer a topic: a small grid of settings, measured by sampling.

Topic search ranks codes; which of them to force, how many and at what strength is a trade-off.
More codes and larger strengths move more stories to the topic but make the text less fluent and,
past a point, repetitive; where the balance lies differs from topic to topic (on the default
model "fire" takes 8 codes at strength 2 within the fluency limit, "slide" 24 at 1.5). Where to
steer matters too on deeper models: on stories260K (5 layers), codes of the last layer alone
moved 55% of calibration stories to "fire" and 50% to "flower", codes from all layers 5% and
25%, while "friend" steered best from all layers (95% against 60%). So the setting is measured,
not guessed, in two rounds:

1. every ``(layers, number of codes, strength, mode)`` of the grid, where ``layers`` keeps only
   codes of the model's last ``n`` codebook layers (``None``: all), samples the paper's prompts
   on a *calibration* seed;
2. the ``finalists`` settings with the highest rates (among those within ``max_fluency`` plus
   :data:`FINALIST_SLACK`, and whose distinct-2 keeps ``min_distinct`` of the unsteered
   samples') sample again on the next seed, and the highest rate over both rounds whose fluency
   ratio over both rounds stays within ``max_fluency`` wins.

One round of 20 samples per setting is noisy: on the default model, "fire" at 8 codes x 2
measured fluency 1.20 on the calibration seed and 1.31 on the evaluation seed, and the best of
nine noisy rates is optimistic by construction. The second round costs a few settings, not the
grid. The distinct-2 floor keeps a setting that loops on the topic word (the default model's
"slide" at 24 codes x 1.5 steered 100% with distinct-2 0.78 against 0.93 unsteered) from winning
on rate. Report the chosen setting's figures from :func:`~codebook.analysis.steer_eval.steer_eval`
on a seed neither round used.

The mode matters too. On stories260K, with each preset's codes and strength (seed 0, 40
samples), ``replace`` (the forced codes are a steered head's whole output) moved 57.5% of
stories to "flower" against 27.5% for ``add`` (they join the head's own top-k), while "dragon"
and "baby" fell from 12.5% and 17.5% to 2.5% and 7.5%; the two-mode grid averaged 33.9%
against 35.7% for ``add`` alone. Both modes are tried by default.

The baseline (unsteered) samples are drawn once per round and shared by all settings.
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
    merge_runs,
    sample_prompts,
    summarize,
)
from codebook.steering import MODES, Steering

LAST_LAYERS = (1, 2, None)
NUM_CODES = (6, 12, 24)
STRENGTHS = (1.5, 2.0, 2.5, 3.0, 4.0)
PER_HEAD = 4
# Below the target of 1.3 for the noise of the evaluation's 40 samples. With one round of 20
# samples a limit of 1.2 was needed (a setting at 1.24 on the calibration seed measured 1.33 on
# another); over both rounds' 40 samples, 1.25: at 1.2 the default model's "fire" and "baby"
# kept settings that steered 57.5% and 62.5%.
MAX_FLUENCY = 1.25
# A finalist may exceed max_fluency by this much in the first round: a setting measured at 1.24
# there may well be within 1.2, and the second round decides.
FINALIST_SLACK = 0.05
FINALISTS = 3
# Steered distinct-2 at least this fraction of the unsteered samples' (word bigram diversity).
MIN_DISTINCT = 0.9
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
    max_fluency: float = MAX_FLUENCY, min_distinct: float = MIN_DISTINCT,
    finalists: int = FINALISTS, prompts=PAPER_PROMPTS, samples_per_prompt: int = 5,
    max_new_tokens: int = 200, temperature: float = 1.0, seed: int = CALIBRATION_SEED,
    progress: bool = True,
) -> Calibration:
    """The best grid setting for a topic (see the module docstring). ``ranked`` is a topic
    search's codes, best first; each setting forces the first ``n`` of them, among those of its
    layers, that :func:`~codebook.analysis.search.select_codes` allows at ``per_head`` codes per
    head. The second round samples seed ``seed + 1`` (``finalists=0``: one round only). When no
    setting keeps fluency within ``max_fluency`` (and distinct-2 above the floor), the most
    fluent one is chosen."""
    check_sampling(model, prompts, samples_per_prompt, max_new_tokens, temperature)
    if not num_codes or not strengths or not last_layers or not modes:
        raise ValueError("the calibration grid needs at least one number of codes, strength, "
                         "set of layers and mode")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown steering modes {unknown}; modes: {list(MODES)}")
    if max_fluency <= 1:
        raise ValueError(f"max_fluency must be above 1 (a ratio of losses), got {max_fluency}")
    if not 0 <= min_distinct <= 1:
        raise ValueError(f"min_distinct must be between 0 and 1 (a fraction of the unsteered "
                         f"distinct-2), got {min_distinct}")
    if finalists < 0:
        raise ValueError(f"finalists must be 0 or more, got {finalists}")
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
                    max_new_tokens=max_new_tokens, temperature=temperature)
    trials, tried = [], set()
    with tqdm(total=len(prompts) * (1 + len(settings)), desc=f"calibrate /{regex}/",
              unit="batch", disable=not progress) as bar:
        baseline_run = sample_prompts(model, None, bar=bar, seed=seed, **sampling)
        baseline = summarize(baseline_run, pattern, prompts)
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
            run = sample_prompts(model, steering, bar=bar, seed=seed, **sampling)
            trials.append({"layers": layers, "num_codes": len(codes), "strength": strength,
                           "mode": mode, **_figures(run, baseline, pattern, prompts),
                           "steering": steering, "run": run})
        distinct_floor = min_distinct * (baseline["distinct_2"] or 0.0)
        ranked_trials = sorted(
            (i for i, t in enumerate(trials)
             if _within(t, max_fluency + FINALIST_SLACK, distinct_floor)),
            key=lambda i: -trials[i]["rate"])[:finalists]
        if ranked_trials:
            bar.total += len(prompts) * (1 + len(ranked_trials))
            bar.refresh()
            second_baseline = sample_prompts(model, None, bar=bar, seed=seed + 1, **sampling)
            both_baseline = summarize(merge_runs(baseline_run, second_baseline), pattern,
                                      prompts)
        for i in ranked_trials:
            trial = trials[i]
            run = merge_runs(trial["run"], sample_prompts(model, trial["steering"], bar=bar,
                                                          seed=seed + 1, **sampling))
            trial["both_rounds"] = _figures(run, both_baseline, pattern, prompts)
    for trial in trials:
        del trial["run"]
    final = [i for i in ranked_trials
             if _within(trials[i]["both_rounds"], max_fluency, distinct_floor)]
    first_round = [i for i, t in enumerate(trials) if _within(t, max_fluency, distinct_floor)]
    if final:  # the highest rate; among equal rates, the most fluent
        chosen = max(final, key=lambda i: (trials[i]["both_rounds"]["rate"],
                                           -trials[i]["both_rounds"]["fluency_ratio"]))
    elif first_round:
        chosen = max(first_round,
                     key=lambda i: (trials[i]["rate"], -trials[i]["fluency_ratio"]))
    else:
        chosen = min(range(len(trials)),
                     key=lambda i: trials[i]["fluency_ratio"] or float("inf"))
    steering = trials[chosen]["steering"]
    for trial in trials:
        del trial["steering"]
    record = {"last_layers_grid": list(last_layers), "num_codes_grid": list(num_codes),
              "strength_grid": [float(s) for s in strengths],
              "per_head": per_head, "mode_grid": list(dict.fromkeys(modes)),
              "max_fluency": max_fluency, "min_distinct": min_distinct, "finalists": finalists,
              "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed, "prompts": list(prompts),
              "fluency_met": bool(final or first_round)}
    return Calibration(steering, trials, chosen, baseline["rate"], record)


def _figures(run: dict, baseline: dict, pattern, prompts) -> dict:
    """Rate, fluency ratio and distinct-2 of a steered run against the unsteered summary."""
    steered = summarize(run, pattern, prompts)
    return {"rate": steered["rate"], "fluency_ratio": fluency_ratio(steered, baseline),
            "distinct_2": steered["distinct_2"]}


def _within(figures: dict, max_fluency: float, distinct_floor: float) -> bool:
    return (figures["fluency_ratio"] is not None and figures["fluency_ratio"] <= max_fluency
            and (figures["distinct_2"] or 0.0) >= distinct_floor)
