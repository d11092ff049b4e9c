"""Visitors generate together: every generation in progress on a model shares one batched forward
per decoding step.

Each loaded model has a :class:`Batcher`, whose worker thread runs the model for everyone. A
generation (a prompt, a seed, a temperature, a token budget and one steering or none) brings one
batch row per side (unsteered and steered; one row when there is no steering). Between steps the
worker lets rows join and leave:

* new generations run their prompts through the model (those that arrived since the last step
  and have prompts of one length in one forward; the running batch's rows are not in it), sample
  their first tokens, and their KV caches are merged into the running batch's, left-padded to a
  common length (an attention mask hides the padding, explicit position ids give each row its
  own positions);
* a side that wrote an end-of-story token or its last token leaves at once, and so does a
  generation whose visitor stopped it (or went away): its stream is closed;
* every step then feeds each row its last token, each row steered by its own steering (per-row
  steering, :class:`codebook.layer.SiteRun`), and samples each row's next token with the row's own
  temperature and random generator, seeded as when writing alone.

A visitor's stories are the same whether they write alone or among many, up to float rounding:
every row keeps its own random generator, and the batched prompts and steps differ from a lone
visitor's only in the order the arithmetic adds up (about 1e-6 of a logit in float32; each row's
attention sees its own tokens only), which changes a sampled token or a code's top-k choice only
when two candidates tie that closely. :data:`DTYPE` set to ``torch.float64`` makes that
practically never (the batch then runs a float64 copy of the model), at several times the cost
per step on a CPU.
Sampling is :mod:`app.generation`'s (:func:`~app.generation.sample_tokens`): pure sampling at
the temperature (greedy at 0), on the CPU, each row drawing from its own generator what it would
draw alone, the rest of the arithmetic done for all rows at once; each row's noise is drawn in
another thread while the model computes the logits (:meth:`Batcher._noise`). Each codebook is
prepared once for all steps (:func:`codebook.ops.prepared_codebooks`), not once per site call, and
the batch's KV cache keeps room for the next tokens (:class:`_RoomyLayer`) instead of being copied
whole at every step.

The steps run ahead of the visitors' pages: each generation has a queue of token snapshots, one
per step, that its page reads at its own pace (so a slow page slows nobody else).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.generation import draw_noise, sample_tokens
from codebook.layer import SiteRun, TokenPositions, running
from codebook.ops import prepared_codebooks
from codebook.steering import Steering, layer_steerings
from codebook.text import stop_ids

log = logging.getLogger(__name__)

DTYPE: torch.dtype | None = None  # the batch's arithmetic (None: the model's own)
IDLE_SECONDS = 60.0  # a worker with nothing to do for this long ends (a new request restarts it)
STEP_PAUSE = 0.002  # seconds the worker sleeps after each step (see _work)
_STEERINGS_KEPT = 256  # built per-site steerings kept for reuse, by steering
# Token snapshots a second that the streams of a busy batch hand on in all (see Batcher.stream).
UPDATES_PER_SECOND = 40.0
BUSY_INTERVAL = 0.1  # seconds: a stream hands on every step until its share would be this long
CACHE_ROOM = 64  # tokens of room a batch cache keeps ahead (see _RoomyLayer)


@dataclasses.dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    steerings: list[Steering | None]  # one per row: [None] or [None, steering]
    seed: int
    temperature: float
    max_new_tokens: int
    updates: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    rows: list[_Row] = dataclasses.field(default_factory=list)
    ended: bool = False

    def snapshot(self) -> tuple[list[int], list[int]]:
        """(unsteered, steered) tokens so far; one list twice when the generation is unsteered
        (one row: both columns are one computation)."""
        unsteered = list(self.rows[0].tokens)
        return unsteered, (unsteered if len(self.rows) == 1 else list(self.rows[-1].tokens))


@dataclasses.dataclass(eq=False)
class _Row:
    request: _Request
    sites: dict  # (layer, site) -> LayerSteering of this row's steering
    generator: torch.Generator
    tokens: list[int] = dataclasses.field(default_factory=list)
    last: int = 0  # the last sampled token: the next step's input
    position: int = 0  # its position id
    done: bool = False


class _RoomyLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values are views of buffers with room for
    ``CACHE_ROOM`` more tokens: a step writes its one token into the room instead of copying the
    whole cache into a new tensor (``torch.cat``), which cost more than the attention itself in a
    batch of 32 rows. Keys or values put in place from outside (the batch's joins and leaves) get
    a new buffer at the next update. The same numbers as a :class:`DynamicLayer`'s."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_room = _appended(self.keys, key_states,
                                              getattr(self, "_key_room", None))
        self.values, self._value_room = _appended(self.values, value_states,
                                                  getattr(self, "_value_room", None))
        return self.keys, self.values


def _appended(cached: torch.Tensor, new: torch.Tensor,
              room: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([cached, new], dim=-2)`` as a view of a buffer with room (``room``, the buffer
    ``cached`` is a view of, when it still is and has room enough; else a new one), and the
    buffer."""
    length = cached.shape[-2] if cached.dim() == 4 else 0
    end = length + new.shape[-2]
    if (room is None or length == 0 or room.shape[-2] < end or room.dtype != new.dtype
            or room.shape[:2] != new.shape[:2] or room.shape[-1] != new.shape[-1]
            or cached.data_ptr() != room.data_ptr() or cached.stride() != room.stride()):
        room = new.new_empty(*new.shape[:2], end + CACHE_ROOM, new.shape[-1])
        if length:
            room[:, :, :length] = cached
    room[:, :, length:end] = new
    return room[:, :, :end], room


def _roomy_cache(config) -> DynamicCache:
    """A :class:`DynamicCache` for the batch, its layers :class:`_RoomyLayer`s."""
    cache = DynamicCache(config=config)
    cache.layers = [_RoomyLayer() for _ in cache.layers]
    return cache


class Batcher:
    """The generations in progress on one model, stepped together by one worker thread."""

    def __init__(self, model, tokenizer):
        # A copy only for another dtype: steering and capture are per call, so the batch and
        # the other tabs share one model.
        same = DTYPE in (None, next(model.parameters()).dtype)
        self.model = model if same else copy.deepcopy(model).to(DTYPE)
        self.device = self.model.device
        self.layers = self.model.codebook_layers()
        head = self.model.base.get_output_embeddings()  # the logits' width
        self._vocab = head.weight.shape[0] if head is not None else self.model.config.vocab_size
        self.stops = set(stop_ids(tokenizer))
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._steerings: dict[str, dict] = {}
        self._prepared: dict = {}  # the codebooks, prepared once for every step (codebook.ops)
        # Draws the rows' sampling noise while the model computes their logits (see _noise).
        self._noise_drawer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="codebook-noise")
        # The running batch (the worker's alone): its rows, KV cache and attention mask [B, L].
        self._rows: list[_Row] = []
        self._generations = 0  # generations in the batch (read by the streams)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None

    # -- the visitors' side ---------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], steering: Steering | None, seed: int,
               temperature: float, max_new_tokens: int) -> _Request:
        request = _Request(list(prompt_ids), [None] if steering is None else [None, steering],
                           seed, float(temperature), int(max_new_tokens))
        with self._cond:
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="codebook-batcher",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def interval(self) -> float:
        """Seconds between a stream's snapshots now: 0 (every step) while the batch is quiet;
        while it holds more generations than ``UPDATES_PER_SECOND * BUSY_INTERVAL``, each stream's
        share of ``UPDATES_PER_SECOND``."""
        every = self._generations / UPDATES_PER_SECOND
        return every if every > BUSY_INTERVAL else 0.0

    def stream(self, request: _Request) -> Iterator[tuple[list[int], list[int]]]:
        """``(unsteered tokens, steered tokens)`` after every step of ``request``, the last one
        always; closing the iterator (a Stop, a visitor gone) takes the request out of the batch.

        While the batch is busy (:meth:`interval`), only the latest snapshot every ``interval``
        seconds: a page shows no more than a few updates a second anyway, and every snapshot
        handed on costs the server a wake-up of this stream's thread and, in the app, an update
        sent to the page, taken from the time the steps need. The end still comes at once."""
        try:
            due = 0.0  # when the next snapshot may go
            while True:
                wait = due - time.monotonic()
                if wait > 0:  # sleep through the steps until then, waking for the end only
                    request.finished.wait(wait)
                latest = None
                while True:
                    try:
                        kind, value = (request.updates.get() if latest is None
                                       else request.updates.get_nowait())
                    except queue.Empty:
                        break
                    if kind == "step":
                        latest = value
                    elif kind == "done":
                        if latest is not None:
                            yield latest
                        return
                    else:
                        raise value
                    if not self.interval():
                        break
                yield latest
                due = time.monotonic() + self.interval()
        finally:
            request.cancelled.set()

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows:
                    if not self._cond.wait(IDLE_SECONDS) and not self._pending:
                        self._thread = None
                        return
                joining, self._pending = self._pending, []
            try:
                self._join_all([r for r in joining if not r.cancelled.is_set()])
                self._leave()
                self._generations = len(dict.fromkeys(row.request for row in self._rows))
                if self._rows:
                    self._step()
                    # Let the server's other threads (its event loop, the visitors' streams)
                    # take the interpreter between steps: a tiny model's step is mostly Python.
                    time.sleep(STEP_PAUSE)
            except BaseException as err:  # the batch itself failed: tell everyone, start afresh
                log.exception("a batched generation step failed")
                for request in {row.request for row in self._rows} | set(joining):
                    self._end(request, err)
                self._rows, self._cache, self._mask = [], None, None

    def _end(self, request: _Request, error: BaseException | None = None) -> None:
        if not request.ended:
            request.ended = True
            request.updates.put(("error", error) if error is not None else ("done", None))
            request.finished.set()

    def _sites(self, steering: Steering | None) -> dict:
        if steering is None:
            return {}
        key = steering.to_json()
        if key not in self._steerings:
            if len(self._steerings) >= _STEERINGS_KEPT:
                self._steerings.clear()
            self._steerings[key] = layer_steerings(steering, self.layers)
        return self._steerings[key]

    def _runs(self, rows: list[_Row], prompt_length: int) -> dict:
        """Every row's own steering, for a forward over ``rows`` whose tokens before
        ``prompt_length`` are the prompt."""
        tokens = TokenPositions(prompt_length)
        touched = {key for row in rows for key in row.sites}
        return {layer: SiteRun(steering=tuple(row.sites.get(key) for row in rows), tokens=tokens)
                for key, layer in self.layers.items() if key in touched}

    def _noise(self, rows: list[_Row]) -> concurrent.futures.Future:
        """The rows' next sampling noise (:func:`app.generation.draw_noise`), drawn in another
        thread: started before the forward, it runs beside it (torch releases the interpreter
        while it draws), and the step waits for it only to sample. The draws, from each row's
        own generator, are the same as when the sampler draws them itself."""
        return self._noise_drawer.submit(draw_noise, [row.request.temperature for row in rows],
                                         [row.generator for row in rows],
                                         self._vocab)

    def _sample(self, rows: list[_Row], logits: torch.Tensor,
                noise: concurrent.futures.Future) -> None:
        """Sample every row's next token at once (each with its own temperature and generator,
        as alone: :func:`app.generation.sample_tokens`) and add it to the row."""
        tokens = sample_tokens(logits, [row.request.temperature for row in rows],
                               [row.generator for row in rows], noise.result())
        for row, token in zip(rows, tokens, strict=True):
            if token in self.stops:
                row.done = True
                continue
            row.tokens.append(token)
            row.last, row.position = token, row.position + 1
            if len(row.tokens) >= row.request.max_new_tokens:
                row.done = True

    def _publish(self, request: _Request) -> None:
        request.updates.put(("step", request.snapshot()))
        if all(row.done for row in request.rows):
            self._end(request)

    def _join_all(self, requests: list[_Request]) -> None:
        """Join ``requests``, those with prompts of one length together (:meth:`_join`). When a
        group fails, its requests join again one by one, so that only a request at fault fails
        (with its error); the others start afresh, with fresh generators."""
        groups: dict[int, list[_Request]] = {}
        for request in requests:
            groups.setdefault(len(request.prompt_ids), []).append(request)
        for group in groups.values():
            try:
                self._join(group)
                continue
            except Exception as err:  # noqa: BLE001 (told below, or found again alone)
                if len(group) == 1:
                    self._refuse(group[0], err)
                    continue
            for request in group:
                try:
                    self._join([request])
                except Exception as err:  # this request's own problem: the batch goes on
                    self._refuse(request, err)

    def _refuse(self, request: _Request, err: Exception) -> None:
        log.warning("a generation could not start: %s: %s", type(err).__name__, err)
        self._end(request, err)

    @torch.no_grad()
    def _join(self, requests: list[_Request]) -> None:
        """Run the prompts of ``requests`` (all of one length; their rows only, in one forward),
        sample their first tokens, and merge the rows still writing into the batch."""
        length = len(requests[0].prompt_ids)
        for request in requests:
            if request.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be at least 1, got "
                                 f"{request.max_new_tokens}")
            if not request.prompt_ids:
                raise ValueError("the prompt has no tokens")
            if len(request.prompt_ids) != length:
                raise ValueError("prompts of different lengths cannot join together")
            request.rows = [_Row(request, self._sites(s),
                                 torch.Generator().manual_seed(request.seed),
                                 position=length - 1) for s in request.steerings]
        rows = [row for request in requests for row in request.rows]
        ids = torch.tensor([row.request.prompt_ids for row in rows], device=self.device)
        cache = _roomy_cache(self.model.config)
        noise = self._noise(rows)
        try:
            with prepared_codebooks(self._prepared), running(self._runs(rows, length)):
                logits = self.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        finally:
            concurrent.futures.wait([noise])  # the generators are free again
        self._sample(rows, logits, noise)
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            self._merge([rows[i] for i in keep], cache, torch.tensor(keep, device=self.device),
                        length)
        for request in requests:
            self._publish(request)

    def _merge(self, rows: list[_Row], cache: DynamicCache, index: torch.Tensor,
               length: int) -> None:
        mask = torch.ones(len(rows), length, dtype=torch.long, device=self.device)
        if self._cache is None:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        width = max(self._mask.shape[1], length)

        def padded(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
            pad = [0, 0] * (t.dim() - 1 - seq_dim % t.dim()) + [width - t.shape[seq_dim], 0]
            return F.pad(t, pad)

        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([padded(mine.keys, -2), padded(theirs.keys[index], -2)])
            mine.values = torch.cat([padded(mine.values, -2), padded(theirs.values[index], -2)])
        self._mask = torch.cat([padded(self._mask, -1), padded(mask, -1)])
        self._rows = self._rows + rows

    def _leave(self) -> None:
        """Take out the rows that are done and those of stopped generations."""
        keep = []
        for i, row in enumerate(self._rows):
            if row.request.cancelled.is_set():
                if not row.request.ended:
                    written = [len(r.tokens) for r in row.request.rows]
                    log.info("a generation was stopped after %s new tokens (%d other rows "
                             "still writing)", " and ".join(map(str, written)),
                             sum(not r.request.cancelled.is_set() and not r.done
                                 for r in self._rows))
                    self._end(row.request)
            elif not row.done:
                keep.append(i)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns that are padding in every row go
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]

    @torch.no_grad()
    def _step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[row.last] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        noise = self._noise(rows)
        try:
            # Every token fed in a step is a generated one.
            with prepared_codebooks(self._prepared), running(self._runs(rows, 0)):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    cache=self._cache, use_cache=True).logits[:, -1]
        finally:
            concurrent.futures.wait([noise])
        self._mask = mask
        self._sample(rows, logits, noise)
        for request in dict.fromkeys(row.request for row in rows):
            self._publish(request)


_batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_batchers_lock = threading.Lock()


def batchable(model) -> bool:
    """Whether the batch can hold ``model``'s KV caches (plain per-layer key and value tensors;
    not sliding-window or recurrent layers)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def batcher(loaded) -> Batcher | None:
    """The batcher of the loaded model ``loaded`` (made on first use), or ``None`` when its model
    cannot be batched."""
    with _batchers_lock:
        if loaded not in _batchers:
            model = loaded.model
            _batchers[loaded] = Batcher(model, loaded.tokenizer) if batchable(model) else None
        return _batchers[loaded]


def side_by_side(loaded, prompt_ids: list[int], steering: Steering | None, seed: int,
                 temperature: float, max_new_tokens: int) -> Iterator[tuple[list[int], list[int]]]:
    """:func:`app.generation.side_by_side`, written in the model's batch (see the module
    docstring): ``(unsteered tokens, steered tokens)`` after every step."""
    shared = batcher(loaded)
    yield from shared.stream(shared.submit(prompt_ids, steering, seed, temperature,
                                           max_new_tokens))
