"""Checkpoints made with the paper's original library, ``codebook-features`` 0.1.2.

That library saves a codebook model as a directory (or Hub repo) whose ``config.json`` has
``model_type: "codebook"`` and whose weights file holds the *full* state dict of the wrapped model:
the base model's weights (possibly fine-tuned with the codebooks) under ``model.``, and every
codebook layer's parameters. Its config does not name the base model, which is needed for the
architecture hyper-parameters (and, often, the tokenizer). The models the paper's authors released
on the Hub (:data:`KNOWN_ORIGINALS`) open by name: their bases come from that table, kept here.
Any other checkpoint needs its base: pass it as ``base`` (a directory or Hub id), or add
``base_model_name_or_path`` to the checkpoint's ``config.json`` (followed only when no
:class:`~codebook.hub.Policy` is given: a repo loaded for someone untrusted never chooses its base).

:func:`load_original` rebuilds such a checkpoint as a :class:`~codebook.CodebookModel` that
computes what the original library computes (see ``tests/fixtures/original/FORMAT.md``):

* their codebook layer LayerNorms its input (eps 1e-5, its own affine per codebook), ranks codes by
  ``x · c / ‖c‖`` (the same ranking as our ``cosine``) or by Euclidean distance, and outputs the
  **mean** of the ``k`` raw codes: our ``layer_norm=True``, ``combine="mean"``;
* their sites map to ours: ``attn_preproj`` → ``attn_heads`` (one codebook per head),
  ``attn`` → ``attn_out``, ``mlp`` → ``mlp_out``, ``transformer_block`` → ``block_out``.

:func:`convert_original` saves the result in this project's format (``python -m codebook
convert-original``). Weights are read from safetensors, or from ``pytorch_model.bin`` with
``torch.load(weights_only=True)`` only, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from codebook import hub
from codebook.architectures import ARCHITECTURES, num_heads
from codebook.configuration import CONFIG_NAME, CodebookConfig
from codebook.modeling import CodebookModel

ORIGINAL_MODEL_TYPE = "codebook"

# Their site names → ours.
SITES = {
    "attn_preproj": "attn_heads",
    "attn": "attn_out",
    "mlp": "mlp_out",
    "transformer_block": "block_out",
}
# Their other sites, with why they have no counterpart here.
UNSUPPORTED_SITES = {
    "qkv": "codebooks on the query/key/value projections",
    "mlp_mid": "a codebook on the MLP's hidden activation",
    "attn_plus_mlp": "a codebook on the sum of the attention and MLP outputs",
}
CODEBOOK_TYPES = ("vanilla", "group")
# What is read from the base model: its config and tokenizer (the checkpoint holds all weights).
BASE_PATTERNS = ["*.json", "*.txt", "*.model"]
# Their similarity_metric → ours. Their inner product ranks by x·c/‖c‖, i.e. cosine similarity
# times ‖x‖, a per-token constant: the same top-k as our cosine similarity.
SIMILARITIES = {"inner_product": "cosine", "euclidean": "euclidean"}

# Their model class (``architectures`` in config.json) → the base model's ``model_type``.
FAMILIES = {
    arch.original.model_class: model_type
    for model_type, arch in ARCHITECTURES.items() if arch.original is not None
}
# Which of the family's wrapped modules (see ``OriginalNames``) keeps each site's
# ``codebook_layer``, relative to a transformer block; "" is the block itself.
_OWNER = {"attn_preproj": "attention", "attn": "attention", "mlp": "mlp", "transformer_block": ""}

# codebook_kwargs that only affect training (dead-code replacement), and the defaults of the
# ones that would change inference.
_TRAINING_ONLY_KWARGS = ("replace_after_steps", "replace_rho")
_INFERENCE_KWARG_DEFAULTS = {"snap": True, "soft_snap": False}

# Buffers that older transformers saved in state dicts (causal masks, rotary frequencies); current
# models recompute them, so they are skipped rather than reported as unexpected.
_STALE_BUFFER = re.compile(r"\.(attn|attention)\.(bias|masked_bias)$|\.inv_freq$")


# -- the paper's released models -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KnownOriginal:
    """A codebook model the paper's authors published on the Hub, with what its ``config.json``
    lacks: the base model it was trained from (its config and tokenizer are read; the checkpoint
    holds every weight), or, for a model trained from scratch, the base config the authors' code
    built. ``source`` says where the base was found."""

    repo_id: str
    family: str  # the base model's model_type
    base: str | None = None  # Hub repo id of the base model
    base_revision: str | None = None  # its commit, pinned where known
    base_config: dict | None = None  # instead of ``base``: the config (model_type included)
    source: str = ""

    @property
    def base_label(self) -> str:
        return self.base or f"a {self.family} config built in the code (no base repo)"


_KNOWN = (
    KnownOriginal(
        "taufeeque/TinyStories-1Layer-21M-Codebook", "gpt_neo",
        base="roneneldan/TinyStories-1Layer-21M",
        base_revision="0d983335d1447a805aa0f4c0c440e257a0a87f44",
        source="the authors' tutorial (tutorials/code_intervention.ipynb of "
               "github.com/taufeeque9/codebook-features: model_name_or_path) and the repo's "
               "model card (\"a fine-tuned version of roneneldan/TinyStories-1Layer-21M\"); "
               "revision: that repo's main on the Hub",
    ),
    KnownOriginal(
        "taufeeque/pythia410m_wikitext_attn_codebook_model", "gpt_neox",
        base="EleutherAI/pythia-410m-deduped",
        source="the authors' code (codebook_circuits/mvp/codebook_patching.py of "
               "github.com/taufeeque9/codebook-features: model_name_or_path); revision unknown",
    ),
    KnownOriginal(
        "taufeeque/TokFSM_k1_codebook_model", "gpt_neox",
        # Trained from scratch: codebook_features/train_fsm_model.py (load_model) builds this
        # GPTNeoXConfig from codebook_features/config/fsm_main.yaml, the rest left at the
        # defaults of transformers 4.28 (rotary_pct 0.25, parallel residual, untied embeddings).
        # The repo has its own tokenizer (ten digits and <|endoftext|>).
        base_config={"model_type": "gpt_neox", "vocab_size": 11, "hidden_size": 128,
                     "num_hidden_layers": 4, "num_attention_heads": 4,
                     "intermediate_size": 512, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                     "max_position_embeddings": 128, "bos_token_id": 10, "eos_token_id": 10,
                     "use_parallel_residual": True, "tie_word_embeddings": False},
        source="the authors' training code for TokFSM (codebook_features/train_fsm_model.py "
               "and config/fsm_main.yaml of github.com/taufeeque9/codebook-features)",
    ),
)
# The codebook models the paper's authors published (huggingface.co/taufeeque), by repo id.
KNOWN_ORIGINALS: dict[str, KnownOriginal] = {k.repo_id: k for k in _KNOWN}
_BY_FOLDED_ID = {k.repo_id.casefold(): k for k in _KNOWN}


def known_original(name: str | os.PathLike) -> KnownOriginal | None:
    """The table's entry for ``name``: a Hub repo id (``@revision`` allowed; the Hub ignores case)
    of a model the paper's authors released; ``None`` for anything else, a local path included."""
    name = str(name).strip()
    if not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    repo_id, _ = hub.split_revision(name)
    return _BY_FOLDED_ID.get(repo_id.casefold())


def _untrusted_base(src) -> ValueError:
    known = ", ".join(KNOWN_ORIGINALS)
    return ValueError(
        f"{src} is a checkpoint of the original codebook-features library that this server does "
        "not know: a repo cannot choose the base model it runs on, so here only the paper's "
        f"released models open by name (their bases are kept in the code: {known}). Convert it "
        "with `python -m codebook convert-original SRC --base BASE --out DIR` and load the "
        "converted copy")


def is_original_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint of the original library (and not ours)."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return False
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == ORIGINAL_MODEL_TYPE


def load_original(
    src: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    token: str | bool | None = None,
    policy: hub.Policy | None = None,
) -> CodebookModel:
    """Load an original-library checkpoint ``src`` (directory or Hub id) on its base model
    ``base`` (directory or Hub id). Without ``base``: the table's base for the paper's released
    models (:data:`KNOWN_ORIGINALS`), else ``base_model_name_or_path`` in ``src``'s config.

    ``dtype`` defaults to the dtype of the checkpoint's weights. ``policy`` (see
    :class:`codebook.hub.Policy`) applies to ``src`` and to the base model; with a policy the
    base is never taken from the checkpoint (a repo loaded for someone untrusted cannot choose the
    model it runs on, or name a directory on the server): only ``base`` or the table's."""
    src_dir = hub.resolve_model_dir(src, revision=revision, token=token, policy=policy)
    if not _weight_files(src_dir):
        # A Hub snapshot only fetches safetensors by default; this layout may store its weights
        # as pytorch_model.bin (read below with weights_only=True).
        src_dir = hub.resolve_model_dir(
            src, revision=revision, token=token,
            allow_patterns=[*hub.HUB_PATTERNS, "pytorch_model*.bin"], policy=policy,
        )
    raw = _read_json(src_dir / "config.json")
    if raw.get("model_type") != ORIGINAL_MODEL_TYPE:
        raise ValueError(f"{src} is not a checkpoint of the original codebook-features library "
                         f"(its config.json has model_type {raw.get('model_type')!r}, not "
                         f"{ORIGINAL_MODEL_TYPE!r})")
    known = known_original(src) if base is None else None
    base_revision = base_config_dict = None
    if known is not None:
        architectures = raw.get("architectures") or []
        if FAMILIES.get(architectures[0] if architectures else None) != known.family:
            raise ValueError(f"{src} is not the {known.family} model the table of the paper's "
                             f"models expects (its config.json names {architectures})")
        base, base_revision, base_config_dict = known.base, known.base_revision, known.base_config
    elif base is None:
        base = raw.get("base_model_name_or_path")
        if policy is not None:
            raise _untrusted_base(src)
    if base is not None and not isinstance(base, str | os.PathLike):
        raise ValueError(f"{src}: base_model_name_or_path in its config.json must be a string")
    if not base and base_config_dict is None:
        raise ValueError(f"{src} does not name its base model (the original library does not "
                         "save it): pass the base model it was trained from, e.g. "
                         "--base roneneldan/TinyStories-1M or base=..., or add "
                         "base_model_name_or_path to its config.json")
    base_dir = None
    if base_config_dict is not None:
        base = f"the {known.family} config of {known.repo_id} kept in the code"
    else:
        try:
            base_dir = hub.resolve_model_dir(base, revision=base_revision, token=token,
                                             allow_patterns=BASE_PATTERNS, policy=policy)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"base model {base}: {err}") from None
    base_config = _base_config(base_dir, base, raw, src, base_config_dict)

    config, specs = _convert_config(raw, base_config, src)
    base_state, codebook_state = _split_state(_read_state(src_dir))
    model = _load_base(base_config, base_state, dtype, src, base)
    tokenizer = hub.load_tokenizer(src_dir)
    if tokenizer is None and base_dir is not None:
        tokenizer = hub.load_tokenizer(base_dir)
    cb_model = CodebookModel(model, config, tokenizer=tokenizer)
    _load_codebooks(cb_model, specs, codebook_state, base_config.model_type, src)
    if device is not None:
        cb_model.to(device)
    return cb_model.eval()


def convert_original(
    src: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> CodebookModel:
    """Load ``src`` with :func:`load_original` and save it to ``out`` in this project's format."""
    out = Path(out)
    src_path = Path(src).expanduser()
    if src_path.is_dir() and out.resolve() == src_path.resolve():
        # Saving there would overwrite the original weights file with the base weights alone.
        raise ValueError(f"--out must differ from the source checkpoint {src}")
    model = load_original(src, base, revision=revision, token=token)
    model.save_pretrained(out)
    return model


# -- config -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} has no config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _base_config(base_dir: Path | None, base, raw: dict, src, config_dict: dict | None = None):
    """The base model's config: read from ``base_dir``, or built from ``config_dict``."""
    from transformers import AutoConfig

    own = config_dict if config_dict is not None else _read_json(base_dir / "config.json")
    model_type = own.get("model_type")
    if model_type == ORIGINAL_MODEL_TYPE:
        raise ValueError(f"base model {base} is itself an original codebook checkpoint; pass "
                         "the plain Hugging Face model it was trained from")
    architectures = raw.get("architectures") or []
    family = FAMILIES.get(architectures[0]) if architectures else model_type
    if family is None:
        raise ValueError(f"{src}: unsupported original model class {architectures[0]!r}; "
                         f"supported: {', '.join(FAMILIES)}")
    if model_type != family:
        raise ValueError(f"{src} was made for a {family} base model ({architectures[0]}), but "
                         f"base model {base} is {model_type!r}")
    if family not in FAMILIES.values():
        raise ValueError(f"base model {base} is {model_type!r}; the original library supports "
                         f"{', '.join(sorted(set(FAMILIES.values())))}")
    if config_dict is not None:
        return AutoConfig.for_model(**config_dict)
    return AutoConfig.from_pretrained(base_dir, trust_remote_code=False)


def _per_site(raw: dict, key: str, default, count: int, src) -> list:
    """The library's broadcast of a per-site option to one value per site."""
    value = raw.get(key, default)
    if not isinstance(value, list | tuple):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{src}: {key} has {len(value)} entries for {count} codebook sites")
    return list(value)


def _convert_config(raw: dict, base_config, src) -> tuple[CodebookConfig, list[tuple]]:
    """Our config, and per site of theirs ``(their site, codebook_type, number of codebooks)``."""
    sites = raw.get("codebook_at", "mlp")
    sites = [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        if site in UNSUPPORTED_SITES:
            raise ValueError(f"{src}: codebook_at {site!r} ({UNSUPPORTED_SITES[site]}) is not "
                             f"supported; supported sites: {', '.join(SITES)}")
        if site not in SITES:
            raise ValueError(f"{src}: unknown codebook_at {site!r}; supported sites: "
                             f"{', '.join(SITES)}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"{src}: codebook_at names a site twice: {sites}")
    if {"attn", "attn_preproj"} <= set(sites):
        # Both hang a codebook_layer on the attention module: their keys cannot be told apart.
        raise ValueError(f"{src}: codebooks at both 'attn' and 'attn_preproj' are not supported")
    n = len(sites)
    types = _per_site(raw, "codebook_type", "vanilla", n, src)
    groups = _per_site(raw, "num_codebooks", 1, n, src)
    ks = _per_site(raw, "k_codebook", 1, n, src)
    codes = _per_site(raw, "num_codes", 100, n, src)
    heads = num_heads(base_config, ARCHITECTURES[base_config.model_type])
    specs = []
    for site, kind, g in zip(sites, types, groups, strict=True):
        if kind not in CODEBOOK_TYPES:
            raise ValueError(f"{src}: codebook_type {kind!r} is not supported; supported: "
                             f"{', '.join(CODEBOOK_TYPES)}")
        g = heads if g == -1 else g  # the library's "one codebook per attention head"
        expected = heads if site == "attn_preproj" else 1
        if g != expected or (kind == "vanilla" and g != 1):
            layout = "one codebook per attention head (group, num_codebooks = heads or -1)"
            if site != "attn_preproj":
                layout = "a single codebook (vanilla, or group with num_codebooks 1)"
            raise ValueError(f"{src}: a {kind} codebook with num_codebooks={g} at {site!r} is "
                             f"not supported; at {site!r} we support {layout}")
        specs.append((site, kind, g))
    for site, c, k in zip(sites, codes, ks, strict=True):
        for key, value in (("num_codes", c), ("k_codebook", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{src}: {key} at {site!r} must be a positive integer, got "
                                 f"{value!r}")
        if k > c:
            raise ValueError(f"{src}: k_codebook {k} at {site!r} must be between 1 and its "
                             f"num_codes {c}")
    similarity = raw.get("similarity_metric", "inner_product")
    if similarity not in SIMILARITIES:
        raise ValueError(f"{src}: similarity_metric {similarity!r} is not supported; supported: "
                         f"{', '.join(SIMILARITIES)}")
    kwargs = dict(raw.get("codebook_kwargs") or {})
    changed = {
        key: value for key, value in kwargs.items()
        if key not in _TRAINING_ONLY_KWARGS
        and (key not in _INFERENCE_KWARG_DEFAULTS or value != _INFERENCE_KWARG_DEFAULTS[key])
    }
    if changed:
        raise ValueError(f"{src}: codebook_kwargs {changed} are not supported")
    # The first site's C and k are the config's; other sites' that differ are overrides.
    per_site = {}
    for site, c, k in zip(sites[1:], codes[1:], ks[1:], strict=True):
        values = {key: v for key, v, first in (("num_codes", c, codes[0]), ("k", k, ks[0]))
                  if v != first}
        if values:
            per_site[SITES[site]] = values
    config = CodebookConfig(
        sites=[SITES[s] for s in sites],
        layers=_layers(raw.get("layers_to_snap", []), base_config.num_hidden_layers, src),
        num_codes=codes[0],
        k=ks[0],
        per_site=per_site,
        similarity=SIMILARITIES[similarity],
        combine="mean",
        layer_norm=True,
    )
    return config, specs


def _layers(value, num_layers: int, src) -> list[int]:
    """``layers_to_snap`` as the library reads it: ``"all"``, negatives counted from the end.
    Indices outside the model get no codebook there (the library skips them without a word), so
    they are dropped here too."""
    if value == "all":
        return list(range(num_layers))
    if not isinstance(value, list | tuple) or not all(isinstance(i, int) for i in value):
        raise ValueError(f"{src}: layers_to_snap must be 'all' or a list of layer indices, "
                         f"got {value!r}")
    layers = (i + num_layers if i < 0 else i for i in value)
    return sorted({i for i in layers if 0 <= i < num_layers})


# -- weights ------------------------------------------------------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: one file or the shards its index lists; safetensors first."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = _read_json(index).get("weight_map", {}).values()
            return [directory / shard for shard in sorted(set(shards))]
    return []


def _read_state(directory: Path) -> dict[str, Tensor]:
    files = _weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} has no weights (model.safetensors or "
                                "pytorch_model.bin)")
    state: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"weight shard {path.name} is missing from {directory}")
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
            continue
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only raises UnpicklingError and others
            raise ValueError(f"cannot read {path} as plain tensors (only weights_only=True "
                             f"loading is allowed): {err}") from None
        if not isinstance(loaded, dict) or not all(isinstance(t, Tensor) for t in loaded.values()):
            raise ValueError(f"{path} does not hold a state dict of tensors")
        state.update(loaded)
    return state


def _split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Base-model weights under their Hugging Face names, and the codebook tensors.

    The library keeps the wrapped model as ``model`` and moves each wrapped module's own weights
    under ``module_layer``; dropping both gives the plain Hugging Face names."""
    base, codebooks = {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("model.").replace(".module_layer", "")
        (codebooks if ".codebook_layer." in name else base)[name] = tensor
    return base, codebooks


def _load_base(base_config, state: dict[str, Tensor], dtype, src, base):
    """The Hugging Face base model with the checkpoint's weights (which may be fine-tuned, so they
    win over the base model's own weights, which are not read)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    weights = {k: t for k, t in state.items() if not _STALE_BUFFER.search(k)}
    if dtype is None:
        dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), None)
    # from_pretrained rather than load_state_dict: it renames keys of older checkpoints (GPT-NeoX's
    # embed_out is lm_head now) and re-ties tied weights (GPT-2's lm_head, saved only as wte).
    model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)].from_pretrained(
        None, config=base_config, state_dict=weights, dtype=dtype,
        output_loading_info=True, ignore_mismatched_sizes=True,
    )
    problems = [f"{key} has shape {tuple(ckpt)} in the checkpoint but {tuple(own)} in the base "
                "config" for key, ckpt, own in sorted(info["mismatched_keys"])]
    if info["missing_keys"]:
        problems.append(f"weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
    if info["unexpected_keys"]:
        problems.append(f"weights the base model does not have: "
                        f"{sorted(info['unexpected_keys'])[:5]}")
    if problems:
        raise ValueError(f"{src} does not fit base model {base}: {'; '.join(problems[:3])}")
    return model


def _load_codebooks(model: CodebookModel, specs, state: dict[str, Tensor], family: str,
                    src) -> None:
    """Copy each original codebook (``[C, D]`` + its LayerNorm ``[D]``, ``[D]``) into group ``g``
    of our layer; group ``g`` of an attention site is head ``g``, as in the library's chunks."""
    blocks = model.architecture.layers
    names = ARCHITECTURES[family].original
    used = set()
    with torch.no_grad():
        for (layer_idx, our_site), layer in model.codebook_layers().items():
            site, kind, groups = next(s for s in specs if SITES[s[0]] == our_site)
            owner = getattr(names, _OWNER[site]) if _OWNER[site] else ""
            prefix = ".".join(p for p in (blocks, str(layer_idx), owner, "codebook_layer") if p)
            for g in range(groups):
                leaf = f"{prefix}.codebook.{g}" if kind == "group" else prefix
                for name, target, shape in (
                    ("codebook.weight", layer.codebook, (layer.num_codes, layer.dim)),
                    ("ln.weight", layer.ln_weight, (layer.dim,)),
                    ("ln.bias", layer.ln_bias, (layer.dim,)),
                ):
                    key = f"{leaf}.{name}"
                    if key not in state:
                        raise ValueError(f"{src}: no weights {key!r} for the codebook at layer "
                                         f"{layer_idx} {site!r} that config.json describes")
                    if tuple(state[key].shape) != shape:
                        raise ValueError(f"{src}: {key} has shape {tuple(state[key].shape)}, "
                                         f"config.json and the base model give {shape}")
                    target[g].copy_(state[key])
                    used.add(key)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{src}: codebook weights that config.json does not describe (check "
                         f"codebook_at and layers_to_snap): {extra[:5]}")
