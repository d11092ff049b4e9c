"""k-means initialisation of every codebook from the base model's own activations.

Each group (attention head) of each site gets its own k-means over that head's activations,
batched over groups: the original library ran k-means over the concatenated heads, which cannot
initialise per-head codebooks. Activations are recorded while every codebook acts as the identity,
so the whole forward pass is exactly the base model's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from codebook import CodebookModel
from codebook.ops import SIMILARITIES

# Tokens scored against all centroids at once (bounds memory to ~chunk * groups * codes floats).
_ASSIGN_CHUNK = 2048


@torch.no_grad()
def record_site_inputs(
    model: CodebookModel, batches: Iterable[Tensor], max_tokens: int
) -> dict[tuple[int, str], Tensor]:
    """Inputs ``[groups, tokens, dim]`` of every codebook layer (after its optional LayerNorm) on
    up to ``max_tokens`` tokens, with each codebook replaced by the identity."""
    layers = model.codebook_layers()
    recorded: dict = {key: [] for key in layers}

    def make_hook(key, layer):
        def hook(module, args, output):
            x = args[0]
            h = layer.normalize(x.reshape(-1, layer.groups, layer.dim))
            recorded[key].append(h.transpose(0, 1).float())
            return x  # identity: downstream sites see the base model's activations

        return hook

    handles = [layer.register_forward_hook(make_hook(key, layer)) for key, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for input_ids in batches:
            model(input_ids=input_ids.to(model.device))
            seen += input_ids.numel()
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: torch.cat(parts, dim=1)[:, :max_tokens] for key, parts in recorded.items()}


@torch.no_grad()
def kmeans(
    x: Tensor, num_codes: int, iters: int, similarity: str, generator: torch.Generator
) -> Tensor:
    """Centroids ``[groups, num_codes, dim]`` of ``x`` ``[groups, n, dim]``, one k-means per group.

    Seeded by k-means++; points are assigned with the codebook's own similarity (cosine: by
    direction); a centroid is the mean of its points, so it keeps their typical norm. Empty
    clusters restart at a random point. With fewer points than codes, points are reused with a
    little noise.

    ``generator`` is a CPU generator whatever the device of ``x``: random numbers are drawn on
    the CPU and moved to ``x``'s device, so a seed gives the same centroids on every device.
    """
    groups, n, dim = x.shape
    device = x.device
    if n < num_codes:
        start = torch.randint(n, (groups, num_codes), generator=generator).to(device)
        centroids = torch.gather(x, 1, start[..., None].expand(-1, -1, dim)).clone()
        noise = torch.randn(centroids.shape, generator=generator).to(device, x.dtype)
        centroids += 1e-3 * x.std() * noise
    else:
        centroids = _kmeans_plus_plus(x, num_codes, similarity, generator)
    offsets = torch.arange(groups, device=device)[:, None] * num_codes
    points = x.reshape(groups * n, dim)
    for _ in range(iters):
        assignment = _assign(x, centroids, similarity)  # [groups, n]
        flat = (assignment + offsets).reshape(-1)
        sums = torch.zeros(groups * num_codes, dim, dtype=x.dtype, device=device)
        sums.index_add_(0, flat, points)
        counts = torch.bincount(flat, minlength=groups * num_codes).reshape(groups, num_codes)
        new = sums.reshape(groups, num_codes, dim) / counts.clamp_min(1)[..., None]
        empty = counts == 0
        if empty.any():
            restart = torch.randint(n, (int(empty.sum()),), generator=generator).to(device)
            new[empty] = x[empty.nonzero()[:, 0], restart]
        centroids = new
    return centroids


def _kmeans_plus_plus(x: Tensor, num_codes: int, similarity: str,
                      generator: torch.Generator) -> Tensor:
    """k-means++ seeding per group: each next centroid is a point drawn with probability
    proportional to its distance (the similarity's ``kmeans_distance``: squared Euclidean, or
    ``1 - cos`` for cosine) to the nearest centroid so far, which keeps plain random seeding from
    stacking centroids in one cluster."""
    groups, n, dim = x.shape
    device = x.device
    rows = torch.arange(groups, device=device)
    measure = SIMILARITIES[similarity]
    points = measure.prepared(x)
    chosen = torch.empty(groups, num_codes, dtype=torch.long, device=device)
    chosen[:, 0] = torch.randint(n, (groups,), generator=generator).to(device)
    nearest = torch.full((groups, n), float("inf"), dtype=x.dtype, device=device)
    for i in range(1, num_codes):
        last = points[rows, chosen[:, i - 1]]  # [groups, dim]
        nearest = torch.minimum(nearest, measure.kmeans_distance(points, last))
        weights = nearest.clamp_min(0) + 1e-12  # all points equal: still a valid distribution
        # Drawn on the CPU with the CPU generator (see kmeans): one [groups, n] copy per code.
        chosen[:, i] = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(device)
    return x[rows[:, None], chosen].clone()


def _assign(x: Tensor, centroids: Tensor, similarity: str) -> Tensor:
    scores = SIMILARITIES[similarity].scores
    parts = []
    for start in range(0, x.shape[1], _ASSIGN_CHUNK):
        chunk = x[:, start : start + _ASSIGN_CHUNK].transpose(0, 1)  # [n, g, d]
        parts.append(scores(chunk, centroids).argmax(-1).T)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def kmeans_init(
    model: CodebookModel, batches: Iterable[Tensor], max_tokens: int, iters: int, seed: int
) -> None:
    """Set every codebook to k-means centroids of its site's activations on ``batches``.

    With ``combine="sum"`` the output adds ``k`` codes, so centroids are divided by ``k`` to make
    the initial output about the size of the input, where that leaves the selection unchanged
    (a ``scale_invariant`` similarity: cosine, inner product; Euclidean keeps full centroids).
    """
    inputs = record_site_inputs(model, batches, max_tokens)
    generator = torch.Generator().manual_seed(seed)
    for key, layer in model.codebook_layers().items():
        centroids = kmeans(inputs[key], layer.num_codes, iters, layer.similarity, generator)
        if layer.combine == "sum" and SIMILARITIES[layer.similarity].scale_invariant:
            centroids /= layer.k
        layer.codebook.copy_(centroids.to(layer.codebook.dtype))
