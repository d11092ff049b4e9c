"""Visitors generate together (:mod:`app.batching`): through ``gradio_client`` against ``python
app.py`` whose batch steps are slowed down (so that concurrent generations really share steps)
and print their row count, and in-process for a request the batch itself refuses."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import tests.test_app_server as server
from tests.test_app_server import build_hub_cache, generate, running_app, texts
from tests.test_app_units import build_app_model

# app.py with every batched step slowed down and its row count printed.
BATCH_APP = """
import runpy, time
from app.lean_imports import skip_unused_imports
skip_unused_imports()  # as app.main does, before transformers is imported
import app.batching as batching
step = batching.Batcher._step
def slow(self):
    print(f"batch rows: {{len(self._rows)}}", flush=True)
    time.sleep({delay})
    step(self)
batching.Batcher._step = slow
runpy.run_path("app.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_app_model(tmp_path_factory.mktemp("batch-model") / "tiny")


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("batch-hub")
    build_hub_cache(cache, server.HUB_REPO, model_dir)
    slow_app, server.SLOW_APP = server.SLOW_APP, BATCH_APP
    try:
        with running_app(model_dir, cache, step_delay=0.03) as run:
            server.SLOW_APP = slow_app
            yield run
    finally:
        server.SLOW_APP = slow_app


@pytest.fixture(scope="module")
def dragon(model_dir):
    preset = json.loads((model_dir / "topics.json").read_text())["dragon"]
    return [f"{c['layer']}:{c['site']}:{c['head']}:{c['code']}" for c in preset["codes"]]


def most_rows(lines: list[str], since: int) -> int:
    return max((int(m.group(1)) for line in lines[since:]
                if (m := re.match(r"batch rows: (\d+)", line))), default=0)


def visitors(dragon: list[str]) -> list[dict]:
    """Sixteen visitors, each with its own seed, temperature and steering (none, a part of the
    dragon preset, or all of it at another strength, mode or positions)."""
    steerings = [dict(codes=()), dict(codes=dragon), dict(codes=dragon[:2], strength=8.0),
                 dict(codes=dragon[2:], mode="replace"), dict(codes=dragon, positions="prompt"),
                 dict(codes=dragon[:1], strength=-4.0), dict(codes=dragon, positions="generated"),
                 dict(codes=dragon[1:3], strength=2.0)]
    return [dict(seed=i, temperature=(0.0 if i % 4 == 3 else 1.0), max_tokens=24,
                 **steerings[i % len(steerings)]) for i in range(16)]


def story(result: dict) -> tuple:
    return result["unsteered"], result["steered"], tuple(result["tokens"])


def together(url: str, requests: list[dict]) -> list[dict]:
    clients = [Client(url, verbose=False) for _ in requests]  # connected before anyone starts
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda c, r: texts(generate(c, **r)), clients, requests,
                             timeout=240))


def test_a_visitors_stories_are_the_same_alone_and_among_fifteen_others(app, dragon):
    url, lines = app
    client = Client(url, verbose=False)
    requests = visitors(dragon)
    alone = [texts(generate(client, **r)) for r in requests]
    assert most_rows(lines, 0) <= 2  # one visitor at a time: its own rows only
    since = len(lines)
    results = together(url, requests)
    assert most_rows(lines, since) >= 16  # many visitors shared steps
    for request, mine, theirs in zip(requests, alone, results, strict=True):
        assert story(theirs) == story(mine), request
    # The steerings differ, and each row got its own: no two steered stories of one seed agree
    # by accident, and steering changed some stories.
    assert any(r["steered"] != r["unsteered"] for r in alone)
    assert len({r["steered"] for r in alone}) > len(requests) // 2


def test_different_steerings_in_one_batch_do_not_leak(app, dragon):
    url, lines = app
    client = Client(url, verbose=False)
    # The same seed and prompt: only the steering differs between the visitors.
    requests = [dict(seed=7, temperature=0.0, max_tokens=24, codes=c, strength=s)
                for c, s in [((), 4.0), (dragon, 8.0), (dragon[:1], -8.0), (dragon[2:], 8.0)]]
    alone = [texts(generate(client, **r)) for r in requests]
    since = len(lines)
    results = together(url, requests * 4)
    assert most_rows(lines, since) >= 8
    for i, result in enumerate(results):
        assert story(result) == story(alone[i % 4])
    assert alone[0]["steered"] == alone[0]["unsteered"]  # unsteered: both sides the same
    assert len({r["steered"] for r in alone}) == 4  # every steering writes its own story


def test_a_stop_mid_batch_stops_only_that_visitor(app, dragon):
    url, lines = app
    client = Client(url, verbose=False)
    # Greedy: the test model's stories never end early.
    requests = [dict(seed=0, temperature=0.0, max_tokens=48, codes=c)
                for c in (dragon, dragon[:2], ())]
    alone = [texts(generate(client, **r)) for r in requests]
    assert all(r["tokens"] == [48, 48] for r in alone)
    since = len(lines)
    jobs = [generate(Client(url, verbose=False), **r) for r in requests]
    deadline = time.monotonic() + 60
    while len(jobs[0].outputs()) < 2 and time.monotonic() < deadline:  # it is writing
        time.sleep(0.05)
    jobs[0].cancel()
    for job, mine in zip(jobs[1:], alone[1:], strict=True):
        assert story(texts(job)) == story(mine)
    stopped = [m for line in lines[since:]
               if (m := re.search(r"a generation was stopped after (\d+) and (\d+) new tokens",
                                  line))]
    assert len(stopped) == 1, lines[since:]
    assert 0 < int(stopped[0].group(1)) < 48 and 0 < int(stopped[0].group(2)) < 48


def test_bad_requests_do_not_break_the_batch_for_others(app, dragon):
    url, lines = app
    client = Client(url, verbose=False)
    good = [dict(seed=s, temperature=1.0, max_tokens=24, codes=dragon) for s in range(4)]
    alone = [texts(generate(client, **r)) for r in good]
    bad = [dict(codes=["the dragon"]), dict(codes=["9:attn_heads:0:1"]), dict(strength="abc"),
           dict(prompt="the " * 125), dict(prompt="x" * 100_000), dict(strength=-11),
           dict(codes=[f"0:attn_heads:0:{c}" for c in range(5)])]
    clients = [Client(url, verbose=False) for _ in good + bad]
    jobs = [generate(c, **r) for c, r in zip(clients, good + bad, strict=True)]
    for job, mine in zip(jobs, alone, strict=False):
        assert story(texts(job)) == story(mine)
    for job in jobs[len(good):]:
        with pytest.raises(AppError):
            job.result()
    assert story(texts(generate(client, **good[0]))) == story(alone[0])  # and it still serves


def test_a_request_the_batch_refuses_fails_alone(model_dir):
    """A generation that fails when it joins (here: steering a site the model lacks, which the
    app's own checks refuse earlier) fails with its error; the others in the batch go on."""
    from app import batching
    from app.models import load
    from codebook.steering import Steering

    loaded = load(str(model_dir))
    prompt = loaded.tokenizer("the girl ran", add_special_tokens=False)["input_ids"]
    steering = Steering(["0:attn_heads:0:1"], strength=4.0)
    alone = [list(batching.side_by_side(loaded, prompt, steering, s, 1.0, 40))[-1]
             for s in range(3)]
    results: list = [None] * 3
    errors = []

    def good(i):
        results[i] = list(batching.side_by_side(loaded, prompt, steering, i, 1.0, 40))[-1]

    def bad():
        try:
            list(batching.side_by_side(loaded, prompt, Steering(["5:mlp_out:0:1"]), 0, 1.0, 40))
        except ValueError as err:
            errors.append(err)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    threads.insert(1, threading.Thread(target=bad))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(errors) == 1 and results == alone


def test_a_batch_samples_each_row_as_torch_multinomial_samples_it_alone():
    """app.generation.sample_tokens: every row draws from its own generator what
    ``torch.multinomial`` draws for it alone (the library's generate samples one row so), whatever
    the other rows and their temperatures; a greedy row takes no draw. The noise drawn
    beforehand (app.generation.draw_noise, as the batch draws it beside the forward) is the
    same."""
    from app.generation import draw_noise, sample_tokens

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    temperatures = [1.0, 0.0, 0.7, 1.3, 0.0, 1.0]
    alone, batched = [], []
    for step in range(20):
        step_logits = logits.roll(step, dims=1)
        gens = [torch.Generator().manual_seed(100 * step + i) for i in range(6)]
        batched.append(sample_tokens(step_logits, temperatures, gens))
        gens = [torch.Generator().manual_seed(100 * step + i) for i in range(6)]
        noise = draw_noise(temperatures, gens, 500)
        assert sample_tokens(step_logits, temperatures, gens, noise) == batched[-1]
        gens = [torch.Generator().manual_seed(100 * step + i) for i in range(6)]
        alone.append([
            int(row.argmax()) if t == 0 else
            int(torch.multinomial(torch.softmax(row / t, -1), 1, generator=g))
            for row, t, g in zip(step_logits, temperatures, gens, strict=True)])
        # And a row sampled alone through sample_tokens draws the same again.
        gens = [torch.Generator().manual_seed(100 * step + i) for i in range(6)]
        assert batched[-1] == [sample_tokens(row[None], [t], [g])[0]
                               for row, t, g in zip(step_logits, temperatures, gens, strict=True)]
    assert batched == alone
    gen = torch.Generator().manual_seed(5)
    sample_tokens(logits, temperatures, [gen] * 6)  # one generator, four draws
    again = torch.Generator().manual_seed(5)
    for _ in range(4):
        torch.empty(500).exponential_(generator=again)
    assert torch.equal(gen.get_state(), again.get_state())
