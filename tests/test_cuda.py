"""The same behaviour on a CUDA device as on the CPU: the op, a codebook model, steering and a
short bf16 finetune. Skipped on machines without a GPU; `.ci/gpu_check` runs it on one."""

from __future__ import annotations

import json

import pytest
import torch

from codebook import CodebookModel, CodeRef, Steering, attach_codebooks
from codebook.ops import SIMILARITIES, codebook_grad, topk_codebook
from tests.tiny_models import VOCAB, tiny_base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def random_inputs(device, groups=4, dim=16, codes=300, tokens=257, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, groups, dim, generator=generator)
    codebook = torch.randn(groups, codes, dim, generator=generator)
    return x.to(device), codebook.to(device)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_op_on_cuda_equals_cpu(similarity, combine):
    x, codebook = random_inputs("cpu")
    bias = torch.zeros(4, 300)
    bias[1, 7] = float("inf")
    bias[2, :5] = -float("inf")
    grad_out = torch.arange(x.numel()).reshape(x.shape).sin()
    results = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).clone().requires_grad_()
        cbd = codebook.to(device).clone().requires_grad_()
        out, idx = topk_codebook(xd, cbd, 8, bias.to(device), None, similarity, combine, 1.0, 64)
        out.backward(grad_out.to(device))
        results[device] = [t.detach().cpu() for t in (out, idx, cbd.grad)]
    cpu, cuda = results["cpu"], results["cuda"]
    # Near-ties may rank differently across devices; nearly all choices must agree.
    assert (cuda[1] == cpu[1]).float().mean() > 0.99
    same = (cuda[1] == cpu[1]).all(-1)
    torch.testing.assert_close(cuda[0][same], cpu[0][same], rtol=1e-4, atol=1e-4)
    # The CUDA backward equals the CPU formula applied to the codes CUDA chose.
    expected = codebook_grad(x, codebook, cuda[0], cuda[1], grad_out, bias, None, combine, 1.0)
    torch.testing.assert_close(cuda[2], expected, rtol=1e-4, atol=1e-5)
    assert (cuda[1][:, 1] == 7).any(-1).all(), "the +inf code is chosen at every token"
    assert not (cuda[1][:, 2] < 5).any(), "-inf codes are never chosen"


def test_op_opcheck_on_cuda():
    x, codebook = random_inputs(CUDA, tokens=33)
    torch.library.opcheck(torch.ops.codebook.topk_codebook.default,
                          (x.requires_grad_(), codebook.requires_grad_(), 4),
                          {"chunk_size": 8})


def test_op_runs_in_bf16_and_keeps_the_dtype():
    x, codebook = random_inputs(CUDA)
    out, idx = topk_codebook(x.bfloat16(), codebook, 8)
    assert out.dtype == torch.bfloat16 and idx.shape == (257, 4, 8)
    _, ref_idx = topk_codebook(x, codebook, 8)
    assert (idx == ref_idx).float().mean() > 0.9


def tiny_cuda_model():
    model = attach_codebooks(tiny_base("llama"), sites=["attn_heads", "mlp_out"],
                             num_codes=24, k=3)
    torch.manual_seed(1)
    for layer in model.codebook_layers().values():
        layer.codebook.data.normal_()
    return model.eval()


def test_model_on_cuda_matches_cpu_and_generates_with_the_cache():
    model = tiny_cuda_model()
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        cpu_logits = model(ids).logits
        model.to(CUDA)
        cuda_logits = model(ids.to(CUDA)).logits.cpu()
        torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-3, atol=1e-3)
        steering = Steering([CodeRef(1, "attn_heads", 2, 5)], strength=2.0)
        runs = [model.generate(ids.to(CUDA), max_new_tokens=10, do_sample=False, use_cache=cache,
                               steering=steering) for cache in (True, False)]
        with model.capture_codes() as captured, model.steer(steering):
            model(runs[0])
    assert torch.equal(runs[0], runs[1])
    chosen = captured[(1, "attn_heads")][0]
    assert (chosen[..., 2, :] == 5).any(-1).all(), "the forced code is on at every position"


def test_short_bf16_finetune_on_cuda(tmp_path):
    from test_training_support import make_material

    from training.config import FinetuneConfig
    from training.trainer import finetune

    material = make_material(tmp_path / "material")
    out = finetune(FinetuneConfig(
        base=str(material["llama"]), data=[str(material["stories"])], output=str(tmp_path / "run"),
        device="cuda", block_size=32, batch_size=8, max_steps=30, num_codes=16, k=2,
        sites=["attn_heads"], kmeans_tokens=512, kmeans_iters=3, warmup_steps=2, eval_every=10,
        log_every=5, checkpoint_every=0, progress=False, lr_base=3e-3, lr_codebook=3e-3))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    model = CodebookModel.from_pretrained(out, device="cuda")
    assert model.device.type == "cuda"
