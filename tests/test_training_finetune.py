"""End-to-end finetuning on tiny random models (training/trainer.py and friends)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_training_support import make_material

from codebook import CodebookModel
from training.config import FinetuneConfig
from training.trainer import finetune, lr_factor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("material"))


def tiny_config(material, output, **overrides) -> FinetuneConfig:
    options = dict(base=str(material["llama"]), data=[str(material["stories"])],
                   output=str(output), block_size=32, batch_size=4, max_steps=8,
                   num_codes=16, k=2, sites=["attn_heads", "mlp_out"], kmeans_tokens=512,
                   kmeans_iters=3, warmup_steps=2, eval_every=4, log_every=2,
                   checkpoint_every=0, threads=1, progress=False, lr_base=3e-3,
                   lr_codebook=3e-3)
    return FinetuneConfig(**(options | overrides))


@pytest.mark.slow
def test_finetune_end_to_end_writes_a_loadable_model_card_metrics_and_plots(material, tmp_path):
    out = finetune(tiny_config(material, tmp_path / "run", max_steps=30))
    model = CodebookModel.from_pretrained(out)
    assert sorted(model.codebook_layers()) == [(i, s) for i in (0, 1)
                                               for s in ("attn_heads", "mlp_out")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.5  # it learned the stories
    assert all(set(r["reconstruction_mse"]) == {"0:attn_heads", "0:mlp_out", "1:attn_heads",
                                                "1:mlp_out"} for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12, 16, 20, 24, 28]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["loss"] == pytest.approx(records[-1]["final"]["loss"])
    assert 0 < evaluation["bits_per_byte"] < evaluation["without_codebooks"]["bits_per_byte"] + 5
    card = (out / "README.md").read_text()
    assert f"{evaluation['bits_per_byte']:.4f}" in card and str(material["llama"]) in card
    assert "python -m training finetune --base" in card
    for plot in ("loss.png", "code_usage.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved counts are the training choices: batch * block * k per group per step
    counts = model.codebook_layers()[(0, "attn_heads")].code_counts
    assert counts.sum(1).tolist() == [30 * 4 * 32 * 2] * 4


def test_every_trainable_parameter_changes_in_one_step(material, tmp_path):
    snapshots = {}

    def on_step(step, model):
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    config = tiny_config(material, tmp_path / "run", max_steps=1, layer_norm=True,
                         sites=["attn_heads", "attn_out", "mlp_out", "block_out"])
    finetune(config, on_step=on_step)
    before, after = snapshots[0], snapshots[1]
    assert len(before) > 30 and any("ln_weight" in n for n in before)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_resume_after_interruption_reaches_the_same_weights(material, tmp_path):
    # GPT-2 keeps dropout on, and revival re-seeds codes every couple of steps: resuming must
    # reproduce the data order, dropout masks, optimizer, schedule and code-usage state.
    options = dict(base=str(material["gpt2"]), max_steps=7, checkpoint_every=2,
                   dead_code_steps=2, num_codes=32, eval_every=0)
    straight = finetune(tiny_config(material, tmp_path / "straight", **options))

    class Interrupted(Exception):
        pass

    def interrupt(step, model):
        if step == 5:
            raise Interrupted

    interrupted = tiny_config(material, tmp_path / "resumed", **options)
    with pytest.raises(Interrupted):
        finetune(interrupted, on_step=interrupt)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step-00000004"
    resumed = finetune(tiny_config(material, tmp_path / "resumed", resume=True, **options))

    for name in ("model.safetensors", "codebooks.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert different == [], name

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["revived_codes"]) for r in map(json.loads, lines)
                if "loss" in r]

    assert losses(straight) == losses(resumed)
    assert sum(revived for _, _, revived in losses(straight)) > 0  # revival did happen


def test_resume_refuses_a_changed_recipe_and_a_fresh_run_refuses_old_checkpoints(material,
                                                                                   tmp_path):
    finetune(tiny_config(material, tmp_path / "run", max_steps=3, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"recipe differs .*\['k'\]"):
        finetune(tiny_config(material, tmp_path / "run", max_steps=3, checkpoint_every=2,
                             resume=True, k=3))
    with pytest.raises(FileExistsError, match="pass --resume"):
        finetune(tiny_config(material, tmp_path / "run", max_steps=3))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune(tiny_config(material, tmp_path / "other", resume=True))


def test_baseline_without_codebooks_saves_a_plain_model(material, tmp_path):
    out = finetune(tiny_config(material, tmp_path / "plain", codebooks=False, max_steps=3))
    assert not (out / "codebook_config.json").exists()
    evaluation = json.loads((out / "eval.json").read_text())
    assert "sites" not in evaluation and evaluation["bits_per_byte"] > 0
    assert "no codebooks" in (out / "README.md").read_text()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cosine = [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(20)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:], strict=False))
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(15, 4, 20, "constant", 0.1) == 1.0


def test_a_run_without_matplotlib_finishes_with_a_note_instead_of_plots(material, tmp_path,
                                                                         monkeypatch, capsys):
    # matplotlib comes with the app extra only: training must not need it.
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ImportError
    out = finetune(tiny_config(material, tmp_path / "run", max_steps=2, eval_every=0))
    assert not (out / "loss.png").exists() and not (out / "code_usage.png").exists()
    notes = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "no plots" in notes[0]
    card = (out / "README.md").read_text()
    assert "loss.png" not in card and "code_usage.png" not in card
    assert CodebookModel.from_pretrained(out).codebook_layers()
