"""The codes chosen at each token of a text: one forward pass with the codes captured.

Steered generation gives the same codes with and without KV cache (a property of the core), so
one pass over the whole generated text, with the same steering and the same prompt boundary,
shows exactly the codes that were active while it was written.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from app.models import LoadedModel
from codebook.steering import Steering
from codebook.steering_spec import steers


@dataclasses.dataclass
class TokenCodes:
    """``tokens[i]`` is the text of token ``i`` (the document separator first, shown as ``""``);
    ``codes[(layer, site)]`` is ``[tokens, groups, k]``, best-ranked code first."""

    token_ids: list[int]
    tokens: list[str]
    codes: dict[tuple[int, str], np.ndarray]
    prompt_length: int
    steering: Steering | None

    def rows(self, position: int) -> list[dict]:
        """One row per (layer, site, head): the codes chosen at token ``position``, and which of
        them the steering forced."""
        forced = {(c.layer, c.site, c.head, c.code) for c in self.steering.codes} if (
            self.steering is not None and self._steered(position)) else set()
        rows = []
        for (layer, site), codes in sorted(self.codes.items()):
            for head, chosen in enumerate(codes[position].tolist()):
                rows.append({
                    "layer": layer, "site": site, "head": head, "codes": chosen,
                    "forced": [c for c in chosen if (layer, site, head, c) in forced],
                })
        return rows

    def _steered(self, position: int) -> bool:
        return steers(self.steering.positions, in_prompt=position < self.prompt_length)


@torch.no_grad()
def token_codes(loaded: LoadedModel, token_ids: list[int], prompt_length: int,
                steering: Steering | None) -> TokenCodes:
    model = loaded.model
    ids = torch.tensor([token_ids], device=model.device)
    with model.steer(steering, prompt_length=prompt_length), \
            model.capture_codes() as captured:
        model(input_ids=ids, use_cache=False)
    surfaces = loaded.surfaces()
    codes = {key: calls[0][0].cpu().numpy() for key, calls in captured.items()}
    tokens = [surfaces[t] if 0 <= t < len(surfaces) else "" for t in token_ids]
    return TokenCodes(list(token_ids), tokens, codes, prompt_length, steering)
