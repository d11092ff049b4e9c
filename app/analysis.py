"""What the Codes tab and the Steer tab's topic search read: a model's code activation index
(``code_index.safetensors``, made by ``python -m codebook index``: one's own copy in the data
directory first, else the one beside the model, see :mod:`codebook.analysis.userdata`), queried with
:mod:`codebook.analysis.search`, :mod:`codebook.analysis.contexts` and
:mod:`codebook.analysis.promote`.

A model without an index still steers; the searches then raise :class:`NoIndexError`, whose
message tells the visitor what is missing and how the model's author can add it.
"""

from __future__ import annotations

import threading
import weakref

from app import inputs
from app.inputs import InputError
from app.models import LoadedModel
from codebook.analysis.index import INDEX_NAME, CodeIndex, Layout
from codebook.analysis.regex import Regex, compile_regex
from codebook.analysis.userdata import analysis_file
from codebook.steering import CodeRef

# Example contexts shown per code in search tables (each code costs a scan of its hits).
EXAMPLES_PER_CODE = 2
WINDOW = 6


class NoIndexError(InputError):
    """The model has no code index, so there is nothing to search."""


class _Analysis:
    """The index of one model and what is derived from it, loaded on first use."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.lock = threading.Lock()
        self.index: CodeIndex | None = None
        self.texts: list[str] | None = None  # each indexed document's text
        self.labels: dict[str, str] = {}  # code (LAYER:SITE:HEAD:CODE) → its label


_analyses: weakref.WeakKeyDictionary[LoadedModel, _Analysis] = weakref.WeakKeyDictionary()
_analyses_lock = threading.Lock()


def _analysis(loaded: LoadedModel) -> _Analysis:
    with _analyses_lock:
        if loaded not in _analyses:
            _analyses[loaded] = _Analysis(loaded)
        return _analyses[loaded]


def _index_path(loaded: LoadedModel):
    return analysis_file(loaded.directory, INDEX_NAME)


def has_index(loaded: LoadedModel) -> bool:
    return _index_path(loaded).is_file()


def index(loaded: LoadedModel) -> CodeIndex:
    """The model's index, loaded once and checked against its codebooks."""
    state = _analysis(loaded)
    with state.lock:
        if state.index is None:
            if not has_index(loaded):
                raise NoIndexError(
                    f"the model {loaded.label!r} has no code index, so codes cannot be searched "
                    "or browsed (steering still works). Its author can add one with: python -m "
                    "codebook index --model MODEL --data TEXT_FILES")
            try:
                loaded_index = CodeIndex.load(_index_path(loaded))
                loaded_index.layout.check_model(loaded.model)
            except ValueError as err:
                raise NoIndexError(f"the code index of {loaded.label!r} cannot be used: {err}"
                                   ) from None
            state.index = loaded_index
        return state.index


def document_texts(loaded: LoadedModel) -> list[str]:
    """The text of every indexed document, computed once."""
    from codebook.text import spans

    idx = index(loaded)
    state = _analysis(loaded)
    with state.lock:
        if state.texts is None:
            state.texts = [spans(idx.document(d), loaded.surfaces())[0]
                           for d in range(idx.num_documents)]
        return state.texts


def index_summary(loaded: LoadedModel) -> str:
    idx = index(loaded)
    return f"{idx.num_documents:,} documents, {idx.num_tokens:,} tokens"


def _row(loaded: LoadedModel, score) -> dict:
    """A search result with the code's top activating contexts, the hit in brackets."""
    from codebook.analysis.contexts import code_summary

    contexts = code_summary(index(loaded), score.ref, loaded.surfaces(), EXAMPLES_PER_CODE,
                            WINDOW)["contexts"]
    shown = [f"{c['before']}[{c['token']}]{c['after']}".replace("\n", " ").strip()
             for c in contexts]
    return {**score.to_dict(), "example": " · ".join(shown)}


def _visitor_regex(pattern: str) -> Regex:
    """A visitor's regex, its matching for this request limited to the app's time."""
    return compile_regex(pattern, time_limit=inputs.REGEX_TIME_LIMIT)


def topic_search(loaded: LoadedModel, pattern: str, top: int = 12) -> tuple[list[dict], str]:
    """Codes whose activations fall most often in stories after the topic's first mention (the
    ``context`` statistic of :mod:`codebook.analysis.search`: the codes that keep the model writing
    about
    it), each with an example context; and a one-line summary of what was searched."""
    from codebook.analysis.search import topic_search as search

    texts = document_texts(loaded)
    idx = index(loaded)
    try:
        regex = _visitor_regex(pattern)
        if not any(regex.search(text) for text in texts):
            raise InputError(f"none of the {len(texts):,} indexed stories matches /{pattern}/: "
                             "try another word")
        found = search(idx.documents(), idx.layout, loaded.surfaces(), {"topic": regex},
                       top=top)["topic"]
    except ValueError as err:
        raise InputError(str(err)) from None
    summary = (f"{found.topic_documents} of {found.documents} indexed stories match /{pattern}/. "
               "Codes ranked by the share of their activations that fall after the topic's "
               "first mention (precision; recall: the share of those tokens they fire on)")
    return [_row(loaded, s) for s in found.codes], summary


def code_search(loaded: LoadedModel, pattern: str, top: int = 25) -> tuple[list[dict], str]:
    """Codes ranked by F1 of precision and recall on the tokens ``pattern`` marks."""
    from codebook.analysis.search import code_search as search
    from codebook.analysis.search import regex_targets

    idx = index(loaded)
    try:
        targets = regex_targets(idx, loaded.surfaces(), _visitor_regex(pattern))
        scores = search(idx, targets, top=top)
    except ValueError as err:
        raise InputError(str(err)) from None
    summary = f"/{pattern}/ marks {int(targets.sum()):,} of {idx.num_tokens:,} indexed tokens"
    return [_row(loaded, s) for s in scores], summary


def code_details(loaded: LoadedModel, ref: CodeRef, contexts: int = 12,
                 promoted: int = 12) -> dict:
    """What ``ref`` promotes (needs only the model) and, when the model has an index, how often
    it fires and its top activating contexts (``count`` and ``contexts`` are ``None`` without)."""
    from codebook.analysis.contexts import code_summary
    from codebook.analysis.promote import promoted_tokens

    try:
        Layout.of_model(loaded.model).flat(ref)  # raises naming the problem
    except ValueError as err:
        raise InputError(str(err)) from None
    try:
        promotes = promoted_tokens(loaded.model, ref, promoted, loaded.surfaces())
    except ValueError:
        promotes = []  # a model family whose final norm promote.py does not know
    details = {"code": str(ref), "count": None, "contexts": None, "promoted_tokens": promotes}
    if has_index(loaded):
        details.update(code_summary(index(loaded), ref, loaded.surfaces(), contexts, 10))
    return details


LABEL_TOKENS = 2  # promoted tokens in a code's label


def _label_word(surface: str) -> str:
    word = surface.strip()
    if word:
        return word
    return "↵" if "\n" in surface else "␣"


def code_labels(loaded: LoadedModel, codes) -> dict[str, str]:
    """A short label for each of ``codes`` (``CodeRef`` or text): the tokens it promotes most
    (its direct effect on the next token, :mod:`codebook.analysis.promote`), e.g. ``dragon,
    fire``; ``""`` for a code that does not exist or a model whose final norm is unknown.
    Computed once per code and model (one matrix product for all the codes not seen yet)."""
    import torch

    from codebook.analysis.promote import residual_vector
    from codebook.architectures import get_module

    refs = {}
    for code in codes:
        try:
            ref = code if isinstance(code, CodeRef) else CodeRef.parse(str(code))
        except ValueError:
            continue
        refs[str(ref)] = ref
    state = _analysis(loaded)
    with state.lock:
        missing = [name for name in refs if name not in state.labels]
    if missing:
        model = loaded.model
        vectors, names, labels = [], [], {}
        with torch.no_grad():
            for name in missing:
                try:
                    vectors.append(residual_vector(model, refs[name]))
                    names.append(name)
                except ValueError:
                    labels[name] = ""
            try:
                norm = get_module(model.base, model.architecture.final_norm)
            except (AttributeError, ValueError):
                norm, vectors, names = None, [], []
                labels.update(dict.fromkeys(missing, ""))
            if vectors:
                residual = torch.stack(vectors)
                if getattr(norm, "weight", None) is not None:
                    residual = residual * norm.weight.float()
                unembedding = model.base.get_output_embeddings().weight
                logits = residual.to(unembedding.dtype) @ unembedding.T  # [codes, vocab]
                top = logits.float().topk(min(LABEL_TOKENS, logits.shape[-1]), dim=-1).indices
                surfaces = loaded.surfaces()
                for name, ids in zip(names, top.tolist(), strict=True):
                    labels[name] = ", ".join(_label_word(surfaces[i]) if i < len(surfaces)
                                             else str(i) for i in ids)
        with state.lock:
            state.labels.update(labels)
    with state.lock:
        return {name: state.labels.get(name, "") for name in refs}


def labelled(code: str, labels: dict[str, str]) -> str:
    """``code`` with its label beside it: ``0:attn_heads:2:17 · dragon, fire``."""
    label = labels.get(code, "")
    return f"{code} · {label}" if label else code
