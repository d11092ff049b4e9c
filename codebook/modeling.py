"""``CodebookModel``: an unmodified Hugging Face causal LM with codebooks hooked into it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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
from codebook.layer import CodebookLayer
from codebook.steering import Steering

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
        self._prompt_length: int | None = None

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
        """Record the absolute positions of this call's tokens, for position-dependent steering."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        seq_len = ids.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if self._prompt_length is None and self._steering_active():
            self._prompt_length = past + seq_len
            for layer in self.codebook_layers().values():
                if layer.steering is not None and layer.steering.prompt_length is None:
                    layer.steering.prompt_length = self._prompt_length
        positions = torch.arange(past, past + seq_len, device=ids.device)
        for layer in self.codebook_layers().values():
            layer.positions = positions
        return None

    def _steering_active(self) -> bool:
        return any(layer.steering is not None for layer in self.codebook_layers().values())

    # -- running ----------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, steering: Steering | None = None, **kwargs):
        """``base.generate`` with optional steering (its prompt is the input passed here)."""
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
    def steer(self, steering: Steering | dict | None, prompt_length: int | None = None):
        """Apply ``steering`` inside the block. With ``positions`` other than ``"all"``, the
        prompt is ``prompt_length`` tokens, or else the first forward call's tokens."""
        if isinstance(steering, dict):
            steering = Steering.from_dict(steering)
        layers = self.codebook_layers()
        per_site = steering.layer_steerings(layers, prompt_length) if steering else {}
        previous = {key: layer.steering for key, layer in layers.items()}
        saved_prompt_length = self._prompt_length
        self._prompt_length = prompt_length
        for key, layer in layers.items():
            layer.steering = per_site.get(key)
        try:
            yield
        finally:
            self._prompt_length = saved_prompt_length
            for key, layer in layers.items():
                layer.steering = previous[key]

    @contextlib.contextmanager
    def capture_codes(self) -> Iterator[dict[tuple[int, str], list[Tensor]]]:
        """Record the chosen code ids: ``{(layer, site): [ids per forward call]}``, each
        ``[batch, seq, groups, k]``."""
        layers = self.codebook_layers()
        captured: dict = {key: [] for key in layers}
        for key, layer in layers.items():
            layer.capture = captured[key]
        try:
            yield captured
        finally:
            for layer in layers.values():
                layer.capture = None

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
                    commit_message: str = "Upload codebook model") -> str:
        """Save to a temporary directory and upload it as a model repo; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=commit_message)
        return str(info)


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

