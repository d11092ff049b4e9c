"""Code usage during training: global counts across processes, and dead-code revival.

Each ``CodebookLayer`` counts its own process's code choices in ``code_counts``. After every
optimizer step :meth:`CodeUsage.after_step` all-reduces the step's new counts, so the buffers hold
the global counts on every process (and a saved model's counts cover all of its training data).

Dead-code revival, as ``threshold_ema_dead_code`` in vector-quantize-pytorch: a code that no
process chose for ``dead_after`` steps is re-seeded with an activation recently seen at its site
(kept in a small per-group reservoir), and its AdamW moments are cleared so that stale momentum
does not drag it away again. Process 0 chooses the new vectors and broadcasts them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from codebook import CodebookLayer
from codebook.ops import SIMILARITIES


class CodeUsage:
    """Tracks when each code was last used and revives the ones unused for ``dead_after`` steps
    (``0``: never). ``reservoir_size`` recent activations are kept per group for re-seeding."""

    def __init__(self, layers: dict[tuple[int, str], CodebookLayer], dead_after: int,
                 reservoir_size: int | None = None):
        self.layers = layers
        self.dead_after = dead_after
        self.last_used = {key: torch.zeros_like(layer.code_counts) for key, layer in layers.items()}
        self._counted = {key: layer.code_counts.clone() for key, layer in layers.items()}
        self.reservoirs: dict[tuple[int, str], Tensor] = {}
        self.reservoir_fill = {key: 0 for key in layers}
        self._handles = []
        if dead_after:
            for key, layer in layers.items():
                size = reservoir_size or layer.num_codes
                self.reservoirs[key] = torch.zeros(
                    layer.groups, size, layer.dim, device=layer.codebook.device
                )
                self._handles.append(layer.register_forward_pre_hook(self._sampler(key)))

    def _sampler(self, key):
        layer = self.layers[key]

        @torch.no_grad()
        def hook(module, args):
            if not module.training:
                return
            h = layer.normalize(args[0].reshape(-1, layer.groups, layer.dim)).float()
            reservoir = self.reservoirs[key]
            size = reservoir.shape[1]
            # A quarter of the reservoir per forward: recent, yet drawn from several batches.
            take = min(h.shape[0], max(1, size // 4))
            rows = torch.randint(h.shape[0], (take,), device=h.device)
            slots = (self.reservoir_fill[key] + torch.arange(take, device=h.device)) % size
            reservoir[:, slots] = h[rows].transpose(0, 1)
            self.reservoir_fill[key] += take

        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Synchronise the counts of optimizer step ``step`` (1-based) across processes, update
        last use, and revive dead codes. Returns how many codes were revived."""
        keys = list(self.layers)
        deltas = [self.layers[k].code_counts - self._counted[k] for k in keys]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([delta.flatten() for delta in deltas])  # one collective per step
            dist.all_reduce(flat)
            deltas = [part.view_as(delta) for part, delta in
                      zip(flat.split([d.numel() for d in deltas]), deltas, strict=True)]
        revived = 0
        for key, delta in zip(keys, deltas, strict=True):
            layer = self.layers[key]
            layer.code_counts.copy_(self._counted[key] + delta)
            self._counted[key] = layer.code_counts.clone()
            self.last_used[key][delta > 0] = step
            if self.dead_after:
                revived += self._revive(key, step, optimizer)
        return revived

    def _revive(self, key, step: int, optimizer) -> int:
        dead = step - self.last_used[key] >= self.dead_after  # identical on every process
        num_dead = int(dead.sum())
        filled = min(self.reservoir_fill[key], self.reservoirs[key].shape[1])
        if not num_dead or not filled:
            return 0
        layer = self.layers[key]
        group_of_dead = dead.nonzero()[:, 0]
        picks = torch.randint(filled, (num_dead,), device=group_of_dead.device)
        vectors = self.reservoirs[key][group_of_dead, picks]
        if layer.combine == "sum" and SIMILARITIES[layer.similarity].scale_invariant:
            vectors = vectors / layer.k  # the same output scale as k-means initialisation
        codebook = layer.codebook.data
        codebook[dead] = vectors.to(codebook.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(codebook, src=0)
        if optimizer is not None:
            for moment in optimizer.state.get(layer.codebook, {}).values():
                if torch.is_tensor(moment) and moment.shape == codebook.shape:
                    moment[dead] = 0
        self.last_used[key][dead] = step  # a grace period of `dead_after` steps to be chosen
        return num_dead

    def dead_fraction(self, step: int) -> dict[tuple[int, str], float]:
        """Per site, the fraction of codes unused in the last ``dead_after`` steps (or ever,
        when revival is off)."""
        window = self.dead_after or step + 1
        return {key: float((step - last >= window).float().mean())
                for key, last in self.last_used.items()}

    # -- checkpointing ------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """What a resumed run needs (the counts themselves are model buffers, saved with it)."""
        state = {}
        for key in self.layers:
            name = f"{key[0]}.{key[1]}"
            state[f"last_used.{name}"] = self.last_used[key]
            if key in self.reservoirs:
                state[f"reservoir.{name}"] = self.reservoirs[key]
                state[f"reservoir_fill.{name}"] = torch.tensor(self.reservoir_fill[key])
        return state

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        for key in self.layers:
            name = f"{key[0]}.{key[1]}"
            self.last_used[key].copy_(state[f"last_used.{name}"])
            if key in self.reservoirs:
                self.reservoirs[key].copy_(state[f"reservoir.{name}"])
                self.reservoir_fill[key] = int(state[f"reservoir_fill.{name}"])

