"""Torch-free generation from a bundle's ONNX decoder: onnxruntime, numpy and tokenizers only.

Nothing on this module's import path imports torch: of ``codebook`` it reads only the torch-free
:mod:`codebook.steering_spec` (``tests/test_export.py`` runs it with torch blocked), so it works
where torch is not installed at all.

Example::

    from cbexport.runtime import CodebookRuntime
    rt = CodebookRuntime("bundle/")
    print(rt.generate_text("Once upon a time", max_new_tokens=40))
    steer = rt.steering(codes="2:attn_heads:3:17", strength=2.0)
    print(rt.generate_text("Once upon a time", max_new_tokens=40, steering=steer))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from cbexport import manifest as mf
from cbexport.steer import topic_spec
from codebook.steering_spec import Steering, steering_arrays, steers

PROVIDERS = ("auto", "cpu", "cuda")
# onnxruntime's own default logging level (warnings), restored after probing for CUDA.
_ORT_DEFAULT_SEVERITY = 2
_QUIET = 4  # fatal only


def make_session(path: str | Path, provider: str = "auto",
                 threads: int | None = None) -> ort.InferenceSession:
    """A session on CUDA when it really gets the CUDA provider, else on CPU.

    ``get_available_providers()`` lists CUDA whenever the GPU build is installed, even without a
    GPU or CUDA libraries; the session then logs errors and falls back to CPU by itself. So the
    probe runs with logging silenced and trusts only ``session.get_providers()``.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Generation alternates short graph runs with Python work; idle worker threads spinning
    # between runs only steal the CPU from it (measured: up to 2x slower on a busy 2-core box).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if provider != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        options.log_severity_level = _QUIET
        ort.set_default_logger_severity(_QUIET)
        try:
            session = ort.InferenceSession(
                str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
        if "CUDAExecutionProvider" in session.get_providers():
            return session
        if provider == "cuda":
            raise RuntimeError("the CUDA provider was requested but onnxruntime could not use "
                               "it (no GPU, or CUDA/cuDNN libraries missing)")
        return session  # onnxruntime already fell back to CPU
    if provider == "cuda":
        raise RuntimeError("the CUDA provider was requested but this onnxruntime build has none "
                           "(install onnxruntime-gpu)")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class CodebookRuntime:
    """A bundle's ONNX decoder with its tokenizer, steering and a KV-cached generation loop."""

    def __init__(self, bundle: str | Path, provider: str = "auto", threads: int | None = None):
        self.bundle = Path(bundle)
        self.manifest = mf.read_manifest(self.bundle, need=("onnx",))
        self.session = make_session(self.bundle / mf.FILES["onnx"], provider, threads)
        self.provider = self.session.get_providers()[0]
        self.tokenizer = Tokenizer.from_file(str(self.bundle / mf.FILES["tokenizer"]))
        self.topics = {}
        if self.manifest.get("topics"):
            self.topics = json.loads((self.bundle / mf.FILES["topics"]).read_text())
        model = self.manifest["model"]
        self.num_layers, self.kv_heads, self.head_dim = (
            model["num_layers"], model["kv_heads"], model["head_dim"]
        )
        self.sites = self.manifest["sites"]
        tok = self.manifest["tokenizer"]
        self.bos_id, self.eos_id, self.pad_id = tok["bos_token_id"], tok["eos_token_id"], tok[
            "pad_token_id"]
        self.prepend_bos = tok["prepend_bos"]
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._neutral = {}
        for site in self.sites:
            shape = (site["groups"], site["num_codes"])
            self._neutral[(site["layer"], site["site"])] = (np.zeros(shape, np.float32),
                                                            np.ones(shape, np.float32))

    # -- steering -----------------------------------------------------------------------------

    def steering(self, codes=None, topic: str | None = None, strength: float | None = None,
                 mode: str | None = None, positions: str | None = None, block=None) -> Steering:
        """A steering spec from a code list or a topic preset (whose settings the other
        arguments override)."""
        if (codes is None) == (topic is None):
            raise ValueError("steer with either codes or a topic, not both or neither")
        overrides = {"strength": strength, "mode": mode, "positions": positions, "block": block}
        if topic is not None:
            return topic_spec(self.topics, topic, **overrides)
        return Steering(codes=codes, **{k: v for k, v in overrides.items() if v is not None})

    def _steer_feed(self, arrays: dict | None) -> dict[str, np.ndarray]:
        feed = {}
        for key, (bias, scale) in self._neutral.items():
            if arrays and key in arrays:
                bias, scale = arrays[key]
            feed[mf.steer_name(*key, "bias")] = bias
            feed[mf.steer_name(*key, "scale")] = scale
        return feed

    # -- running ------------------------------------------------------------------------------

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {mf.past_name(i, kind): np.zeros(shape, np.float32)
                for i in range(self.num_layers) for kind in ("key", "value")}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, cache: dict[str, np.ndarray],
                steering: dict | None = None) -> tuple[np.ndarray, dict, dict]:
        """One decoder step: ``(logits [batch, seq, vocab], next cache, codes)``, where
        ``codes[(layer, site)]`` are the selected codes ``[batch, seq, groups, k]``. ``steering``
        is what :func:`cbexport.steer.steering_arrays` returns (``None``: no steering)."""
        feed = {"input_ids": input_ids.astype(np.int64),
                "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64),
                **cache, **self._steer_feed(steering)}
        outputs = dict(zip(self._output_names, self.session.run(None, feed), strict=True))
        next_cache = {mf.past_name(i, kind): outputs[mf.present_name(i, kind)]
                      for i in range(self.num_layers) for kind in ("key", "value")}
        codes = {key: outputs[mf.codes_name(*key)] for key in self._neutral}
        return outputs["logits"], next_cache, codes

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if self.prepend_bos else ids

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int | None = None,
                 steering: Steering | None = None, stop_at_eos: bool = True) -> list[list[int]]:
        """Continue each prompt (token ids); returns the new tokens of each. Prompts of different
        lengths are left-padded. ``temperature`` 0 is greedy; otherwise tokens are sampled from
        ``softmax(logits / temperature)`` with a numpy generator seeded by ``seed``."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rng = np.random.default_rng(seed)
        arrays = steering_arrays(self.sites, steering) if steering else None
        prompt_steer = arrays if steering and steers(steering.positions, in_prompt=True) else None
        decode_steer = arrays if steering and steers(steering.positions, in_prompt=False) else None

        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), self.pad_id, np.int64)
        mask = np.zeros((batch, width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, cache, _ = self.forward(ids, mask, positions, self.empty_cache(batch),
                                        prompt_steer)

        out = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        for step in range(max_new_tokens):
            token = self._pick(logits[:, -1], temperature, rng)
            if stop_at_eos and self.eos_id is not None:
                token = np.where(done, self.pad_id, token)
            for row in np.flatnonzero(~done):
                out[row].append(int(token[row]))
            if stop_at_eos and self.eos_id is not None:
                done |= token == self.eos_id
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, cache, _ = self.forward(token[:, None], mask, positions, cache, decode_steer)
        return out

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
        if temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])

    def generate_text(self, prompt: str | list[str], max_new_tokens: int = 64,
                      **options) -> str | list[str]:
        """Prompt text in, prompt plus continuation out (one string or a list, as given)."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        encoded = [self.encode(t) for t in texts]
        new = self.generate(encoded, max_new_tokens=max_new_tokens, **options)
        results = [self.tokenizer.decode(e + n, skip_special_tokens=True)
                   for e, n in zip(encoded, new, strict=True)]
        return results[0] if isinstance(prompt, str) else results
