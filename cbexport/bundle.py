"""Export a codebook model as a self-describing bundle (layout: :mod:`cbexport.manifest`).

Everything is written to a temporary directory beside the destination and renamed into place only
once the export and its verification have succeeded, so a failure never leaves a half-written
bundle behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cbexport import manifest as mf
from cbexport.card import model_card, source_metadata
from cbexport.decoder import decoder_shape
from cbexport.steer import topic_spec
from codebook import hub
from codebook.analysis.topics import load_topics, topics_path
from codebook.configuration import CONFIG_NAME
from codebook.modeling import CodebookModel
from codebook.steering_spec import steering_arrays


class ExportError(Exception):
    """An export that cannot be done; the message says why."""


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """``"onnx,torchscript"`` or a list → the formats in canonical order."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in mf.FORMATS]
    if unknown or not names:
        raise ExportError(f"unknown format {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(mf.FORMATS)}")
    return [f for f in mf.FORMATS if f in names]


def export_bundle(
    model: str | os.PathLike | CodebookModel,
    out: str | os.PathLike,
    formats: str | Iterable[str] = mf.FORMATS,
    verify: bool = False,
    overwrite: bool = False,
    optimize: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Export ``model`` (``"default"``, a model directory, a Hub id, or a loaded
    :class:`CodebookModel`) to the bundle directory ``out``; returns the manifest.

    ``verify`` runs the full verification (otherwise a quick logits check); a failed check
    raises :class:`ExportError` and leaves no bundle. ``overwrite`` replaces an existing
    non-empty ``out``. ``optimize`` runs the ONNX exporter's graph optimiser.
    """
    formats = parse_formats(formats)
    out = Path(out).expanduser().absolute()
    staging = _staging_dir(out, overwrite)
    try:
        loaded, directory, source = _load(model)
        log(f"loaded {source}")
        was_training = loaded.training
        loaded.eval()  # verification compares inference outputs
        try:
            manifest = _write_bundle(loaded, directory, source, staging, formats, verify,
                                     optimize, log)
        finally:
            loaded.train(was_training)
        _place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return manifest


def _staging_dir(out: Path, overwrite: bool) -> Path:
    """Check the destination and create the temporary directory beside it (failing here, before
    any slow work, when it cannot be written)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} is not empty (overwrite it with --force)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"cannot write to {out.parent}: it is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        raise ExportError(f"cannot write to {out.parent}: {err.strerror or err}") from None
    # mkdtemp makes the directory private; the bundle gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


def _load(model) -> tuple[CodebookModel, Path | None, str]:
    if isinstance(model, CodebookModel):
        if model.base.get_input_embeddings().weight.dtype != torch.float32:
            raise ExportError("export a float32 model (load it with dtype=torch.float32)")
        return model, None, type(model.base).__name__
    name = str(model)
    try:
        directory = hub.resolve_model_dir(name)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(str(err)) from None
    if not (directory / CONFIG_NAME).is_file():
        raise ExportError(f"{name} is not a codebook model: {directory} has no {CONFIG_NAME}")
    try:
        loaded = CodebookModel.from_pretrained(directory, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"cannot load {name}: {err}") from None
    return loaded, directory, name


def _write_bundle(model: CodebookModel, directory: Path | None, source: str, staging: Path,
                  formats: list[str], verify: bool, optimize: bool, log) -> dict:
    from cbexport.verify import verify_bundle  # imports the runtime; only needed here

    manifest = _manifest(model, source, formats)
    _write_tokenizer(model, directory, staging)
    topics = _topics(directory, manifest["sites"])
    if topics:
        shutil.copyfile(topics_path(directory), staging / mf.FILES["topics"])
        manifest["topics"] = sorted(topics)
    try:
        if "onnx" in formats:
            from cbexport.onnx_export import export_onnx

            log("exporting ONNX")
            manifest["onnx"] = export_onnx(model, staging / mf.FILES["onnx"], optimize=optimize)
        if "torchscript" in formats:
            from cbexport.torchscript_export import export_torchscript

            log("tracing TorchScript")
            manifest["torchscript"] = export_torchscript(
                model, staging / mf.FILES["torchscript"], staging / mf.FILES["torchscript_op"]
            )
    except ValueError as err:  # what the model cannot be exported with, e.g. sliding windows
        raise ExportError(str(err)) from None
    _write_json(staging / mf.MANIFEST, manifest)

    log("verifying" + (" (full)" if verify else " (quick)"))
    report = verify_bundle(model, staging, formats, full=verify)
    _write_json(staging / mf.FILES["verification"], report)
    if not report["passed"]:
        failed = [f"{c['name']} ({c.get('max_abs_diff', c.get('identical_tokens'))})"
                  for c in report["checks"] if not c["passed"]]
        raise ExportError(f"verification failed (max logit difference or identical tokens in "
                          f"brackets): {'; '.join(failed)}")
    manifest["file_sizes"] = _sizes(staging)  # the card lists them (all but itself)
    metadata = source_metadata(hub.card_metadata(directory) if directory else {},
                               hub.hub_repo_id(source) if directory else None)
    (staging / mf.FILES["card"]).write_text(model_card(manifest, report, metadata))
    manifest["file_sizes"] = _sizes(staging)
    _write_json(staging / mf.MANIFEST, manifest)
    return manifest


def _manifest(model: CodebookModel, source: str, formats: list[str]) -> dict:
    shape = decoder_shape(model)
    layers = model.codebook_layers()
    config = model.base.config.get_text_config(decoder=True)
    sites = []
    for layer, site in shape.site_keys:
        cb = layers[(layer, site)]
        sites.append({"layer": layer, "site": site, "groups": cb.groups, "dim": cb.dim,
                      "num_codes": cb.num_codes, "k": cb.k,
                      "bias_input": mf.steer_name(layer, site, "bias"),
                      "scale_input": mf.steer_name(layer, site, "scale")})
    return {
        "format_version": mf.FORMAT_VERSION,
        "source": source,
        "formats": formats,
        "model": {"model_type": config.model_type, "architecture": type(model.base).__name__,
                  "num_layers": shape.num_layers, "kv_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "vocab_size": shape.vocab_size,
                  "dtype": "float32"},
        "codebook": model.codebook_config.to_dict(),
        "sites": sites,
        "tokenizer": _special_tokens(model),
        "topics": [],
    }


def _special_tokens(model: CodebookModel) -> dict:
    """Ids the runtime needs. BOS is prepended to every prompt when the model has one: the
    llama2.c models are trained with a BOS before each story, GPT-2-style ones with
    ``<|endoftext|>`` between stories."""
    tok, config = model.tokenizer, model.base.config

    def first(*values):
        for value in values:
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return None

    bos = first(getattr(tok, "bos_token_id", None), config.bos_token_id)
    eos = first(getattr(tok, "eos_token_id", None), config.eos_token_id)
    pad = first(getattr(tok, "pad_token_id", None), eos, 0)
    return {"bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": pad, "prepend_bos": bos is not None}


def _write_tokenizer(model: CodebookModel, directory: Path | None, staging: Path) -> None:
    target = staging / mf.FILES["tokenizer"]
    if directory is not None and (directory / mf.FILES["tokenizer"]).is_file():
        shutil.copyfile(directory / mf.FILES["tokenizer"], target)
    elif getattr(model.tokenizer, "backend_tokenizer", None) is not None:
        model.tokenizer.backend_tokenizer.save(str(target))
    else:
        raise ExportError("the model has no fast tokenizer (tokenizer.json), which the bundle "
                          "needs for its torch-free runtime")


def _topics(directory: Path | None, sites: list[dict]) -> dict:
    """The model's topic presets (one's own copy first, as the app reads them), checked against
    its codebooks (a preset naming a code the model does not have is an error now rather than
    when someone steers with it)."""
    if directory is None:
        return {}
    try:
        topics = load_topics(directory)
    except ValueError as err:
        raise ExportError(str(err)) from None
    for name in topics:
        try:
            steering_arrays(sites, topic_spec(topics, name))
        except ValueError as err:
            raise ExportError(f"{topics_path(directory)}: topic {name!r}: {err}") from None
    return topics


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())
            if p.is_file() and p.name != mf.MANIFEST}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
