"""End to end: export bundles from tiny random models, check them against torch eager, run them
without torch, load the TorchScript in a fresh process, and reject bad input cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, PreTrainedTokenizerFast

from cbexport import __main__ as export_cli
from cbexport import manifest as mf
from cbexport import onnx_function
from cbexport import run as run_cli
from cbexport.bundle import ExportError, export_bundle
from cbexport.decoder import eager_attention
from cbexport.runtime import CodebookRuntime, make_session
from cbexport.torchscript_export import load_torchscript
from cbexport.verify import torch_generate
from codebook import CodebookModel, Steering, attach_codebooks
from codebook.steering_spec import steering_arrays
from tests.tiny_models import VOCAB, tiny_base

REPO = Path(__file__).resolve().parents[1]
TOPICS = {"animals": {"codes": [{"layer": 1, "site": "attn_heads", "head": 2, "code": 5},
                                {"layer": 0, "site": "mlp_out", "head": 0, "code": 7}],
                      "strength": 2.0, "description": "a made-up preset"}}
# Run a snippet with these top-level packages made unimportable (as if not installed).
BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is blocked in this test")
    sys.meta_path.insert(0, _Block())
""")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = ["Once upon a time there was a little girl named Lily. She loved to play outside."]
    tok.train_from_iterator(text * 5, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_codebook_model(family: str, **options) -> CodebookModel:
    model = attach_codebooks(tiny_base(family), tokenizer=tiny_tokenizer(), **options)
    torch.manual_seed(1)
    for layer in model.codebook_layers().values():
        layer.codebook.data.normal_()
    return model.eval()


def run_python(code: str, blocked: tuple[str, ...] = (), cwd: Path = REPO):
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with per-head attention and MLP codebooks, a tokenizer and topic presets."""
    directory = tmp_path_factory.mktemp("llama")
    tiny_codebook_model("llama", sites=["attn_heads", "mlp_out"], num_codes=32, k=4
                        ).save_pretrained(directory)
    (directory / "topics.json").write_text(json.dumps(TOPICS))
    return directory


@pytest.fixture(scope="module")
def model(model_dir) -> CodebookModel:
    return CodebookModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "llama"
    assert export_cli.main(["--model", str(model_dir), "--format", "onnx,torchscript",
                            "--out", str(out), "--verify"]) == 0
    return out


@pytest.fixture(scope="module")
def runtime(bundle) -> CodebookRuntime:
    return CodebookRuntime(bundle, provider="cpu")


# -- the bundle -------------------------------------------------------------------------------

def test_bundle_describes_itself(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert names == {mf.MANIFEST, *mf.FILES.values()}
    manifest = mf.read_manifest(bundle, need=mf.FORMATS)
    assert manifest["formats"] == ["onnx", "torchscript"]
    assert [(s["layer"], s["site"], s["groups"], s["num_codes"], s["k"])
            for s in manifest["sites"]] == [(0, "attn_heads", 4, 32, 4), (0, "mlp_out", 1, 32, 4),
                                            (1, "attn_heads", 4, 32, 4), (1, "mlp_out", 1, 32, 4)]
    assert manifest["topics"] == ["animals"]
    assert json.loads((bundle / "topics.json").read_text()) == TOPICS
    assert manifest["tokenizer"]["bos_token_id"] == 1 and manifest["tokenizer"]["prepend_bos"]
    card = (bundle / "README.md").read_text()
    assert "python -m cbexport.run --bundle . " in card and "--steer animals" in card
    assert "steer.LAYER.SITE.bias" in card and "import codebook_op" in card


def test_full_verification_report(bundle):
    report = json.loads((bundle / "verification.json").read_text())
    assert report["passed"] and report["full"]
    assert report["max_abs_diff"] <= 1e-4
    names = [c["name"] for c in report["checks"]]
    for fmt in ("onnx", "torchscript"):
        for phase in ("prefill", "decode"):
            assert f"{fmt} {phase} logits steered (seed 2)" in names
    greedy = [c for c in report["checks"] if "greedy" in c["name"]]
    assert len(greedy) == 3
    for check in greedy:
        assert check["identical_tokens"] == check["total_tokens"] == 128  # 64 tokens, batch 2
    assert all(c["steering_changed_output"] for c in greedy if "unsteered" not in c["name"])


# -- ONNX -------------------------------------------------------------------------------------

def test_onnx_graph_has_one_custom_node_per_codebook(bundle):
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    nodes = onnx_function.codebook_nodes(model)
    assert len(nodes) == 4
    assert {n.domain for n in model.graph.node} == {"", onnx_function.DOMAIN}
    (function,) = [f for f in model.functions if f.domain == onnx_function.DOMAIN]
    assert function.name == onnx_function.OP_TYPE
    assert [o.version for o in function.opset_import] == [onnx_function.default_opset(model)]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_key_values.1.key"] == ["batch", 2, "past", 8]
    assert dims["present.1.value"][:3] == ["batch", 2, "past + seq"]
    assert dims["steer.1.attn_heads.bias"] == dims["steer.1.attn_heads.scale"] == [4, 32]
    assert dims["codes.1.attn_heads"][2:] == [4, 4] and dims["codes.0.mlp_out"][2:] == [1, 4]


def eager_logits(model, ids, mask, steering=None):
    """Prefill logits and one cached decode step with the torch model itself, and the codes the
    prefill selected."""
    positions = torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))
    cache = DynamicCache()
    with torch.no_grad(), eager_attention(model), model.steer(steering):
        with model.capture_codes() as codes:
            prefill = model(input_ids=torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask), position_ids=positions,
                            cache=cache).logits
        mask2 = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
        decode = model(input_ids=torch.from_numpy(ids[:, -1:]),
                       attention_mask=torch.from_numpy(mask2), position_ids=positions[:, -1:] + 1,
                       cache=cache).logits
    return prefill.numpy(), decode.numpy(), {key: c[0].numpy() for key, c in codes.items()}


def onnx_logits(runtime, ids, mask, steering=None):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    prefill, cache, codes = runtime.forward(ids, mask, positions, runtime.empty_cache(len(ids)),
                                            steering)
    mask2 = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
    decode, _, _ = runtime.forward(ids[:, -1:], mask2, positions[:, -1:] + 1, cache, steering)
    return prefill, decode, codes


def test_onnx_logits_match_eager_and_steering_is_a_runtime_input(model, runtime):
    rng = np.random.default_rng(42)
    ids = rng.integers(0, VOCAB, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    real = mask.astype(bool)
    plain = onnx_logits(runtime, ids, mask)
    steer = runtime.steering(topic="animals")
    steered = onnx_logits(runtime, ids, mask, steering_arrays(runtime.sites, steer))
    torch_steer = Steering(codes=[str(c) for c in steer.codes], strength=steer.strength)
    for got, want in ((plain, eager_logits(model, ids, mask)),
                      (steered, eager_logits(model, ids, mask, torch_steer))):
        np.testing.assert_allclose(got[0][real], want[0][real], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=0)
        assert set(got[2]) == set(want[2])  # the code outputs: same codes, same order
        for key, codes in got[2].items():
            np.testing.assert_array_equal(codes[real], want[2][key][real])
    # Same session, new steering tensors: the output really changes (no re-export needed).
    assert np.abs(steered[1] - plain[1]).max() > 1e-2


def test_batched_generation_equals_one_prompt_at_a_time(runtime):
    prompts = [[1, 5, 9, 13, 17, 21], [1, 40], [1, 7, 7, 7]]
    batched = runtime.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    assert batched == [runtime.generate([p], 12, stop_at_eos=False)[0] for p in prompts]


def test_sampling_is_seeded(runtime):
    prompt = [[1, 5, 9]]
    first = runtime.generate(prompt, 20, temperature=1.0, seed=0, stop_at_eos=False)
    assert first == runtime.generate(prompt, 20, temperature=1.0, seed=0, stop_at_eos=False)
    assert first != runtime.generate(prompt, 20, temperature=1.0, seed=1, stop_at_eos=False)


def test_prompt_only_steering_matches_torch(model, runtime):
    spec = runtime.steering(topic="animals", positions="prompt", mode="replace")
    prompts = [[1, 5, 9, 13], [1, 3]]
    torch_spec = Steering(codes=[str(c) for c in spec.codes], strength=spec.strength,
                          mode="replace", positions="prompt")
    with eager_attention(model):
        want = torch_generate(model, prompts, 16, runtime.pad_id, torch_spec)
        assert want != torch_generate(model, prompts, 16, runtime.pad_id)
    assert runtime.generate(prompts, 16, steering=spec, stop_at_eos=False) == want


def test_runtime_runs_where_torch_is_not_installed(bundle, runtime):
    code = f"""
        import runpy
        sys.argv = ["cbexport.run", "--bundle", {str(bundle)!r}, "--prompt", "Once upon a time",
                    "--steer", "animals", "--max-new-tokens", "12"]
        try:
            runpy.run_module("cbexport.run", run_name="__main__")
        except SystemExit as done:
            assert done.code == 0, done.code
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        # Of codebook, only the torch-free steering spec.
        assert sorted(m for m in sys.modules if m.split(".")[0] == "codebook") == [
            "codebook", "codebook.steering_spec"]
    """
    result = run_python(code, blocked=("torch", "transformers"))
    assert result.returncode == 0, result.stderr
    want = runtime.generate_text("Once upon a time", 12, steering=runtime.steering(
        topic="animals"))
    assert result.stdout.strip() == want.strip()
    assert "provider: CPUExecutionProvider" in result.stderr
    assert "[E:onnxruntime" not in result.stderr and "[W:onnxruntime" not in result.stderr


def test_cuda_is_used_only_when_the_session_gets_it(bundle, capfd):
    session = make_session(bundle / "model.onnx", "auto")
    if "CUDAExecutionProvider" in session.get_providers():
        pytest.skip("a usable GPU is present")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "onnxruntime" not in capfd.readouterr().err  # no error spam from the probe
    with pytest.raises(RuntimeError, match="CUDA provider was requested"):
        make_session(bundle / "model.onnx", "cuda")


# -- TorchScript ------------------------------------------------------------------------------

def test_torchscript_loads_in_a_fresh_process_with_only_torch(bundle, tmp_path):
    decoder = load_torchscript(bundle)
    assert "codebook::topk_codebook" in {n.kind() for n in decoder.inlined_graph.nodes()}
    manifest = mf.read_manifest(bundle)
    rng = np.random.default_rng(3)
    inputs = [torch.from_numpy(rng.integers(0, VOCAB, (2, 5))), torch.ones(2, 5, dtype=torch.long),
              torch.arange(5).expand(2, 5)]
    inputs += [torch.zeros(2, 2, 0, 8) for _ in range(2 * manifest["model"]["num_layers"])]
    for site in manifest["sites"]:
        inputs += [torch.zeros(site["groups"], site["num_codes"]),
                   torch.ones(site["groups"], site["num_codes"])]
    with torch.no_grad():
        expected = decoder(*inputs)[0]
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    code = f"""
        sys.path.insert(0, {str(bundle)!r})
        import torch
        {{import_op}}
        case = torch.load({str(tmp_path / "case.pt")!r})
        decoder = torch.jit.load({str(bundle / "model.torchscript.pt")!r})
        with torch.no_grad():
            logits = decoder(*case["inputs"])[0]
        print(float((logits - case["expected"]).abs().max()))
    """
    blocked = ("codebook", "transformers", "cbexport")
    without = run_python(code.format(import_op=""), blocked=blocked, cwd=tmp_path)
    assert without.returncode != 0 and "Unknown builtin op: codebook::topk_codebook" in (
        without.stderr)
    with_op = run_python(code.format(import_op="import codebook_op"), blocked=blocked,
                         cwd=tmp_path)
    assert with_op.returncode == 0, with_op.stderr
    assert float(with_op.stdout) == 0.0


# -- other families, the Python API, overwriting ----------------------------------------------

def test_gpt2_with_layer_norm_euclidean_mean_via_the_python_api(tmp_path):
    model = tiny_codebook_model("gpt2", sites=["attn_heads"], num_codes=16, k=2,
                                layer_norm=True, similarity="euclidean", combine="mean")
    out = tmp_path / "gpt2"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    manifest = export_bundle(model, out, formats="onnx", overwrite=True, optimize=False)
    assert manifest["formats"] == ["onnx"] and not (out / "stale.txt").exists()
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and not report["full"] and report["max_abs_diff"] <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2"]  # no staging or backup left
    with pytest.raises(mf.BundleError, match="exported without the torchscript format"):
        load_torchscript(out)


# -- bad input --------------------------------------------------------------------------------

def assert_cli_error(capsys, argv, message, main=export_cli.main):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_not_a_codebook_model(tmp_path, capsys):
    plain = tmp_path / "plain"
    tiny_base("llama").save_pretrained(plain)
    assert_cli_error(capsys, ["--model", str(plain), "--out", str(tmp_path / "out")],
                     f"{plain} is not a codebook model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_unknown_format(model_dir, tmp_path, capsys):
    assert_cli_error(capsys, ["--model", str(model_dir), "--format", "onnx,tflite",
                              "--out", str(tmp_path / "out")],
                     "unknown format 'tflite'; choose from onnx, torchscript")
    assert not any(tmp_path.iterdir())


def test_unwritable_output(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_cli_error(capsys, ["--model", str(model_dir), "--out", str(blocker / "bundle")],
                     f"cannot write to {blocker}")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_cli_error(capsys, ["--model", str(model_dir), "--out", str(locked / "b")],
                         "Permission denied")


def test_output_not_empty_needs_force(model_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert_cli_error(capsys, ["--model", str(model_dir), "--out", str(tmp_path)],
                     "is not empty (overwrite it with --force)")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing_behind(tmp_path):
    model = tiny_codebook_model("gpt_neo", sites=["attn_heads"], num_codes=8, k=2)
    with pytest.raises(ExportError, match="sliding_attention layers"):
        export_bundle(model, tmp_path / "neo")
    assert not any(tmp_path.iterdir())


def test_bundle_with_a_missing_file(bundle, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken, ignore=shutil.ignore_patterns("*.pt"))
    (broken / "tokenizer.json").unlink()
    assert_cli_error(capsys, ["--bundle", str(broken), "--prompt", "hi"],
                     f"bundle {broken} is incomplete: missing tokenizer.json", main=run_cli.main)
    assert_cli_error(capsys, ["--bundle", str(tmp_path), "--prompt", "hi"],
                     f"{tmp_path} is not a codebook bundle: it has no bundle.json",
                     main=run_cli.main)


def test_near_tie_judgement():
    """A code difference passes only where torch's own top-k choice was a near-tie, and the
    first difference in execution order (not a downstream consequence) is the one judged."""
    from cbexport.verify import TIE_TOLERANCE, Step, first_code_difference

    sites = [{"layer": 0, "site": "mlp_out", "num_codes": 8},
             {"layer": 0, "site": "attn_heads", "num_codes": 8}]
    codes = {(0, "attn_heads"): np.array([[[[1, 2]]]]), (0, "mlp_out"): np.array([[[[3, 4]]]])}
    real = np.ones((1, 1), bool)

    def ref(margin_heads, margin_mlp):
        margins = {(0, "attn_heads"): np.full((1, 1, 1), margin_heads),
                   (0, "mlp_out"): np.full((1, 1, 1), margin_mlp)}
        return Step(None, codes, margins, real=real)

    same = Step(None, {key: c[..., ::-1] for key, c in codes.items()})  # order does not matter
    assert first_code_difference([ref(0.0, 0.0)], [same], sites) is None
    both = Step(None, {(0, "attn_heads"): np.array([[[[1, 5]]]]),
                       (0, "mlp_out"): np.array([[[[3, 6]]]])})
    # attn_heads runs before mlp_out in a block: its (near-tie) flip explains the mlp one.
    cause = first_code_difference([ref(TIE_TOLERANCE / 2, 0.5)], [both], sites)
    assert (cause["site"], cause["near_tie"]) == ("0:attn_heads", True)
    assert not first_code_difference([ref(0.5, 0.0)], [both], sites)["near_tie"]
    # Codes of padding positions and blocked codes are not compared.
    padded = Step(None, codes, ref(0.5, 0.5).margins, real=np.zeros((1, 1), bool))
    assert first_code_difference([padded], [both], sites) is None
    blocked = np.zeros((1, 8), bool)
    blocked[0, [2, 5, 4, 6]] = True  # the differing slots hold blocked codes on both sides
    masked = Step(None, codes, ref(0.5, 0.5).margins, real=real,
                  blocked={(0, "attn_heads"): blocked, (0, "mlp_out"): blocked})
    assert first_code_difference([masked], [both], sites) is None
