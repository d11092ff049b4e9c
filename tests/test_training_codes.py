"""k-means initialisation of per-head codebooks and dead-code revival."""

from __future__ import annotations

import torch

from codebook import CodebookLayer
from training.code_usage import CodeUsage
from training.kmeans import kmeans


def test_kmeans_finds_each_heads_own_clusters():
    generator = torch.Generator().manual_seed(0)
    groups, clusters, dim = 3, 4, 8
    # every head has its own four well-separated centres, on unit directions of its own
    centres = torch.stack([torch.eye(dim)[torch.randperm(dim, generator=generator)[:clusters]]
                           * (2.0 + g) for g in range(groups)])
    labels = torch.randint(clusters, (groups, 2000), generator=generator)
    points = torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim))
    points = points + 0.05 * torch.randn(points.shape, generator=generator)
    for similarity in ("cosine", "euclidean"):
        found = kmeans(points, clusters, iters=10, similarity=similarity, generator=generator)
        for g in range(groups):
            distance = torch.cdist(centres[g], found[g]).min(1).values
            assert distance.max() < 0.05, (similarity, g)


def test_codes_unused_for_n_steps_are_reseeded_from_recent_inputs():
    torch.manual_seed(0)
    layer = CodebookLayer(groups=2, dim=4, num_codes=16, k=2, combine="sum").train()
    with torch.no_grad():  # codes 0..3 point along the inputs; the others never win
        layer.codebook[:, :4] = torch.tensor([1.0, 1, 1, 1])
        layer.codebook[:, :4] += 0.01 * torch.randn(2, 4, 4)
        layer.codebook[:, 4:] = -torch.tensor([1.0, 1, 1, 1])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    usage = CodeUsage({(0, "attn_heads"): layer}, dead_after=3, reservoir_size=8)
    inputs = torch.rand(5, 6, 8) + 0.5  # positive: cosine-close to codes 0..3 only

    def step(number):
        out = layer(inputs)
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        return usage.after_step(number, optimizer)

    assert [step(n) for n in (1, 2)] == [0, 0]
    before = layer.codebook.detach().clone()
    assert step(3) == 2 * 12  # codes 4..15 of both heads were never chosen in 3 steps
    after = layer.codebook.detach()
    assert (after[:, :4] - before[:, :4]).abs().max() < 2e-3  # one AdamW step, not re-seeded
    seen = usage.reservoirs[(0, "attn_heads")] / layer.k  # recent inputs at the output scale
    for g in range(2):
        for code in range(4, 16):
            assert (seen[g] == after[g, code]).all(-1).any(), (g, code)
    moments = optimizer.state[layer.codebook]
    assert (moments["exp_avg"][:, 4:] == 0).all() and (moments["exp_avg_sq"][:, 4:] == 0).all()
    assert usage.dead_fraction(3) == {(0, "attn_heads"): 0.0}  # revived codes get a grace period
    assert layer.code_counts.sum().item() == 3 * 5 * 6 * 2 * 2
