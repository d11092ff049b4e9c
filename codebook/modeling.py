"""``CodebookModel``: an unmodified Hugging Face causal LM with codebooks hooked into it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from codebook import hub
from codebook.architectures import (
    architecture_for,
    get_module,
    in_features,
    num_heads,
    out_features,
)
from codebook.configuration import CodebookConfig
from codebook.layer import CodebookLayer, SiteRun, TokenPositions, current_runs, running
from codebook.steering import Steering, layer_steerings, row_steerings

WEIGHTS_NAME = "codebooks.safetensors"


class CodebookModel(nn.Module):
    """A causal LM whose chosen sites pass through codebooks.

    The base model's code is untouched: every codebook is a :class:`CodebookLayer` reached by a
    forward hook (or pre-hook) on a real module of the base model. ``forward`` and ``generate``
    are the base model's. Codebook parameters live in ``self.codebooks[str(layer)][site]``.

    A base carries the hooks of one codebook model at a time: attaching to a base that already
    has codebooks raises; :meth:`detach` removes them.
    """

    def __init__(self, base: nn.Module, config: CodebookConfig, tokenizer=None):
        super().__init__()
        if has_codebooks_attached(base):
            raise ValueError(
                "this base model already has codebooks attached (another CodebookModel hooks "
                "into it, and a second set of hooks would stack on the first): call .detach() "
                "on that CodebookModel first, or attach to a fresh copy of the base")
        self.base = base
        self.codebook_config = config
        self.tokenizer = tokenizer
        self.architecture = architecture_for(base.config)
        blocks = get_module(base, self.architecture.layers)
        layers = config.layers if config.layers is not None else list(range(len(blocks)))
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} layers")
        self.codebooks = nn.ModuleDict()
        self._handles = []
        try:
            for i in layers:
                self.codebooks[str(i)] = nn.ModuleDict(
                    {site: self._attach(blocks[i], site) for site in config.sites}
                )
        except BaseException:
            self.detach()  # the hooks of the sites attached before the failure
            raise
        self._handles.append(
            base.register_forward_pre_hook(self._track_positions, with_kwargs=True)
        )

    def detach(self) -> nn.Module:
        """Remove every hook this model put on the base and return the base, which then runs
        exactly as it did before codebooks were attached (and can take new ones). This model
        then runs the bare base too; its codebooks are kept. Calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base

    # -- construction -----------------------------------------------------------------------

    def _new_layer(self, groups: int, dim: int, site: str) -> CodebookLayer:
        c = self.codebook_config
        return CodebookLayer(groups, dim, c.num_codes_at(site), c.k_at(site), c.similarity,
                             c.combine, c.layer_norm, c.reconstruction_weight, c.chunk_size)

    def _attach(self, block: nn.Module, site: str) -> CodebookLayer:
        arch, cfg = self.architecture, self.base.config
        if site == "attn_heads":
            proj = get_module(block, arch.attn_out_proj)
            heads = num_heads(cfg, arch)
            width = in_features(proj)
            if width % heads:
                raise ValueError(f"attention width {width} is not divisible by {heads} heads")
            layer = self._new_layer(heads, width // heads, site)
            self._handles.append(proj.register_forward_pre_hook(layer.input_hook))
        elif site == "attn_out":
            proj = get_module(block, arch.attn_out_proj)
            layer = self._new_layer(1, out_features(proj), site)
            self._handles.append(proj.register_forward_hook(layer.output_hook))
        elif site == "mlp_out":
            layer = self._new_layer(1, cfg.hidden_size, site)
            mlp = get_module(block, arch.mlp)
            self._handles.append(mlp.register_forward_hook(layer.output_hook))
        else:  # block_out (CodebookConfig validated the name)
            layer = self._new_layer(1, cfg.hidden_size, site)
            self._handles.append(block.register_forward_hook(layer.output_hook))
        return layer

    def _track_positions(self, module, args, kwargs):
        """Record the absolute positions of this call's tokens in the active steering block's
        :class:`TokenPositions` (for position-dependent steering; outside a block, nothing)."""
        tokens = self._active_tokens()
        if tokens is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        seq_len = ids.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if tokens.prompt_length is None:
            tokens.prompt_length = past + seq_len
        tokens.current = torch.arange(past, past + seq_len, device=ids.device)
        return None

    def _active_tokens(self) -> TokenPositions | None:
        """The token positions of this context's steering block on this model (its layers share
        one), or ``None``."""
        runs = current_runs()
        for layer in self.codebook_layers().values():
            run = runs.get(layer)
            if run is not None and run.tokens is not None:
                return run.tokens
        return None

    # -- running ----------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, steering: Steering | Sequence[Steering | None] | None = None,
                 **kwargs):
        """``base.generate`` with optional steering (its prompt is the input passed here); a list
        steers each batch row by its own entry, as in :meth:`steer`."""
        if steering is None:
            return self.base.generate(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        with self.steer(steering, prompt_length=None if ids is None else ids.shape[1]):
            return self.base.generate(*args, **kwargs)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def codebook_layers(self) -> dict[tuple[int, str], CodebookLayer]:
        """``{(layer, site): CodebookLayer}`` in layer order."""
        return {
            (int(i), site): layer
            for i, sites in self.codebooks.items()
            for site, layer in sites.items()
        }

    def set_codebooks_enabled(self, enabled: bool) -> None:
        """Switch every codebook on or off; off runs exactly the base model."""
        for layer in self.codebook_layers().values():
            layer.enabled = enabled

    @contextlib.contextmanager
    def codebooks_disabled(self) -> Iterator[None]:
        previous = {key: layer.enabled for key, layer in self.codebook_layers().items()}
        self.set_codebooks_enabled(False)
        try:
            yield
        finally:
            for key, layer in self.codebook_layers().items():
                layer.enabled = previous[key]

    @contextlib.contextmanager
    def steer(self, steering: Steering | dict | Sequence[Steering | dict | None] | None,
              prompt_length: int | None = None):
        """Apply ``steering`` to this model's forward calls inside the block.

        A list steers each batch row by its own entry (``None``: the row is not steered), and
        every call inside must then have that many rows. With ``positions`` other than ``"all"``,
        the prompt is ``prompt_length`` tokens, or else the first forward call's tokens.

        The steering holds in the current thread (context) only: threads that run the model at
        the same time, each in its own ``steer`` block, are each steered by their own."""
        layers = self.codebook_layers()
        if isinstance(steering, list | tuple):
            per_site = row_steerings([_as_steering(s) for s in steering], layers)
        else:
            steering = _as_steering(steering)
            per_site = layer_steerings(steering, layers) if steering else {}
        tokens = TokenPositions(prompt_length) if per_site else None
        runs = current_runs()
        with running({layer: dataclasses.replace(runs.get(layer, SiteRun()),
                                                 steering=per_site.get(key), tokens=tokens)
                      for key, layer in layers.items()}):
            yield

    @contextlib.contextmanager
    def capture_codes(self) -> Iterator[dict[tuple[int, str], list[Tensor]]]:
        """Record the chosen code ids of the forward calls inside the block, in the current
        thread (context) only: ``{(layer, site): [ids per forward call]}``, each
        ``[batch, seq, groups, k]``."""
        layers = self.codebook_layers()
        captured: dict = {key: [] for key in layers}
        runs = current_runs()
        with running({layer: dataclasses.replace(runs.get(layer, SiteRun()),
                                                 capture=captured[key])
                      for key, layer in layers.items()}):
            yield captured

    def reset_code_counts(self) -> None:
        for layer in self.codebook_layers().values():
            layer.code_counts.zero_()

    # -- saving and loading -----------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """One directory: the base model (config + safetensors), ``codebook_config.json``,
        ``codebooks.safetensors`` and the tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(directory, safe_serialization=True)
        self.codebook_config.save(directory)
        state = self.codebooks.state_dict()
        tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        token: str | bool | None = None,
        base: str | os.PathLike | None = None,
    ) -> CodebookModel:
        """Load ``"default"`` (the embedded model), a local directory, or a Hub repo id
        (``owner/name``, optionally ``owner/name@revision``; offline mode and the cache are
        honoured). Weights are only ever read from safetensors files.

        A checkpoint of the original ``codebook-features`` library is loaded on its base model
        ``base`` (see :mod:`codebook.original`; it may read ``pytorch_model.bin``, with
        ``weights_only=True`` only)."""
        from transformers import AutoModelForCausalLM

        from codebook import original  # here, not at the top: codebook.original imports us

        directory = hub.resolve_model_dir(name_or_path, revision=revision, token=token)
        if original.is_original_checkpoint(directory):
            return original.load_original(name_or_path, base, revision=revision, dtype=dtype,
                                          device=device, token=token)
        if base is not None:
            raise ValueError(f"base= is only for checkpoints of the original codebook-features "
                             f"library; {name_or_path} is in this project's format")
        config = CodebookConfig.load(directory)
        try:
            base = AutoModelForCausalLM.from_pretrained(
                directory, use_safetensors=True, trust_remote_code=False, dtype=dtype
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the base model in {directory}: {err}") from None
        model = cls(base, config, tokenizer=hub.load_tokenizer(directory))
        model.load_codebooks(directory / WEIGHTS_NAME)
        if device is not None:
            model.to(device)
        return model.eval()

    def load_codebooks(self, path: str | os.PathLike) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"codebook weights not found: {path}")
        tensors = load_file(str(path))
        own = self.codebooks.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not match the codebook config: missing {missing}, "
                             f"unexpected {unexpected}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config "
                                 f"expects {tuple(own[name].shape)}")
        self.codebooks.load_state_dict(tensors)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload codebook model", card: str | None = None) -> str:
        """Save to a temporary directory and upload it as a model repo; returns the commit URL.
        The repo's ``README.md`` is ``card`` if given, else a short card of what the model is
        (its Hub base as ``base_model``); training runs upload their own, fuller card."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            (Path(tmp) / hub.CARD_NAME).write_text(card if card is not None
                                                   else self._model_card(repo_id))
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=commit_message)
        return str(info)

    def _model_card(self, repo_id: str) -> str:
        c = self.codebook_config
        base = hub.hub_repo_id(getattr(self.base.config, "_name_or_path", "") or "")
        text = (
            f"# {repo_id}\n\nA codebook model ([Codebook Features](https://arxiv.org/abs/2310.17230)"
            f"): {'the Hub model ' + base if base else 'a ' + self.architecture.name + ' base'} "
            f"with {c.num_codes} codes per codebook, k={c.k}, at {', '.join(c.sites)} "
            f"({len(self.codebook_layers())} codebook layers).\n\n```python\n"
            "from codebook import CodebookModel\n\n"
            f"model = CodebookModel.from_pretrained(\"{repo_id}\")\n```\n")
        return hub.model_card(text, base_model=base, pipeline_tag="text-generation",
                              tags=["codebook-features", "interpretability"])


def _as_steering(steering: Steering | dict | None) -> Steering | None:
    return Steering.from_dict(steering) if isinstance(steering, dict) else steering


def has_codebooks_attached(base: nn.Module) -> bool:
    """Whether a :class:`CodebookModel` has hooks on ``base`` (and has not been detached)."""
    for module in base.modules():
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            if isinstance(getattr(hook, "__self__", None), CodebookLayer | CodebookModel):
                return True
    return False


def attach_codebooks(base: nn.Module, config: CodebookConfig | None = None, tokenizer=None,
                     **options) -> CodebookModel:
    """Wrap a Hugging Face causal LM with codebooks (``options`` are CodebookConfig fields).
    A base takes one set of codebooks at a time (see :meth:`CodebookModel.detach`)."""
    if config is None:
        config = CodebookConfig(**options)
    elif options:
        raise ValueError("pass either a CodebookConfig or its fields as keywords, not both")
    return CodebookModel(base, config, tokenizer=tokenizer)

