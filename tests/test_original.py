"""Checkpoints of the paper's original library (codebook-features 0.1.2): loading, conversion.

The fixtures in ``tests/fixtures/original`` were made with that library (``make_fixtures.py``
there, format in ``FORMAT.md``): its logits and chosen code ids on fixed inputs are the reference.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from codebook import CodebookConfig, CodebookModel, Steering
from codebook.__main__ import main
from codebook.original import load_original
from tests.test_hub import build_hub_cache
from tests.test_model import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())
OUR_SITE = {"attn_preproj": "attn_heads", "attn": "attn_out", "mlp": "mlp_out",
            "transformer_block": "block_out"}
PER_SITE = [name for name in NAMES if "sites" in json.loads(
    (FIXTURES / name / "expected.json").read_text())]
LOGITS_ATOL = 1e-4


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def run(model: CodebookModel, input_ids: torch.Tensor):
    """Logits and the chosen code ids, keyed like the fixtures (``codes.layer{L}.{their site}``)."""
    their = {ours: theirs for theirs, ours in OUR_SITE.items()}
    with torch.no_grad(), model.capture_codes() as captured:
        logits = model(input_ids).logits
    codes = {f"codes.layer{layer}.{their[site]}": ids[0] for (layer, site), ids in captured.items()}
    return logits, codes


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def copy_fixture(name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy: ``(codebook dir, base dir)``."""
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name / "codebook", tmp_path / name / "base"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_matches_fixture(model: CodebookModel, name: str) -> float:
    exp = expected(name)
    logits, codes = run(model, exp["input_ids"])
    assert codes.keys() == {k for k in exp if k.startswith("codes.")}
    for key, ids in codes.items():
        assert torch.equal(ids, exp[key]), key
    diff = max_diff(logits, exp["logits"])
    assert diff <= LOGITS_ATOL
    return diff


# -- the original library's numbers -------------------------------------------------------------


def fixture_sites(name: str) -> dict[str, tuple[int, int, int]]:
    """``{our site: (codebooks, num_codes, k)}`` as the fixture's library config gives them
    (a single site's values are scalars, several sites' are per-site lists)."""
    meta = json.loads((FIXTURES / name / "expected.json").read_text())
    if "site" in meta:
        return {OUR_SITE[meta["site"]]: (meta["num_codebooks"], meta["num_codes"],
                                         meta["k_codebook"])}
    return {OUR_SITE[site]: tuple(values) for site, *values in zip(
        meta["sites"], meta["num_codebooks"], meta["num_codes"], meta["k_codebook"], strict=True)}


def assert_sites(model: CodebookModel, name: str) -> None:
    """Every codebook layer has the fixture's number of codebooks, C and k at its site."""
    sites = fixture_sites(name)
    assert model.codebook_config.sites == list(sites)
    for (_, site), layer in model.codebook_layers().items():
        assert (layer.groups, layer.num_codes, layer.k) == sites[site], site
        assert (model.codebook_config.num_codes_at(site),
                model.codebook_config.k_at(site)) == sites[site][1:]


@pytest.mark.parametrize("name", NAMES)
def test_loader_reproduces_the_original_library(name):
    meta = json.loads((FIXTURES / name / "expected.json").read_text())
    fixture = FIXTURES / name
    model = CodebookModel.from_pretrained(fixture / "codebook", base=fixture / "base")
    config = model.codebook_config
    assert config.layers == meta["layers_to_snap"]
    assert (config.combine, config.layer_norm) == ("mean", True)
    assert_sites(model, name)
    assert_matches_fixture(model, name)
    exp = expected(name)
    with torch.no_grad(), model.codebooks_disabled():
        assert max_diff(model(exp["input_ids"]).logits, exp["base_logits"]) <= LOGITS_ATOL


def test_weights_come_from_the_codebook_checkpoint_not_the_base_model(tmp_path):
    # With train_model_params the library fine-tunes the base model with the codebooks, so only
    # the checkpoint's copy of the base weights is right: zero the base model's own file.
    src, base = copy_fixture("gpt2_attn_preproj", tmp_path)
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: torch.zeros_like(t) for k, t in weights.items()}, str(base / "model.safetensors"))
    assert_matches_fixture(load_original(src, base), "gpt2_attn_preproj")


def test_raw_config_forms_of_the_library(tmp_path):
    # What CodebookModelConfig accepts before set_codebook_args rewrites it: a site string,
    # scalars for per-site lists, num_codebooks -1 (one per head), "all" and negative layers.
    src, base = copy_fixture("gpt2_attn_preproj", tmp_path)
    edit_json(src / "config.json", codebook_at="attn_preproj", codebook_type="group",
              num_codebooks=-1, k_codebook=2, num_codes=32, layers_to_snap="all")
    assert_matches_fixture(load_original(src, base), "gpt2_attn_preproj")
    src, base = copy_fixture("gpt2_mlp", tmp_path)
    edit_json(src / "config.json", layers_to_snap=[-1, 7])  # 7: no such layer, the library skips
    assert_matches_fixture(load_original(src, base), "gpt2_mlp")


def test_euclidean_similarity_ranks_by_distance(tmp_path):
    # No fixture was trained with it: check the ids against the library's -cdist ranking of
    # the LayerNormed input, on layer 0 (whose input no codebook has touched yet).
    src, base = copy_fixture("gpt2_attn_preproj", tmp_path)
    edit_json(src / "config.json", similarity_metric="euclidean")
    model = load_original(src, base)
    exp = expected("gpt2_attn_preproj")
    _, codes = run(model, exp["input_ids"])
    layer = model.codebook_layers()[(0, "attn_heads")]
    heads = exp["cb_in.layer0.attn_preproj"].chunk(layer.groups, dim=-1)
    for g, x in enumerate(heads):
        xn = F.layer_norm(x, (layer.dim,), layer.ln_weight[g], layer.ln_bias[g], eps=1e-5)
        scores = -torch.cdist(xn, layer.codebook[g])
        assert torch.equal(codes["codes.layer0.attn_preproj"][:, :, g], scores.topk(2).indices)
    cosine_ids = exp["codes.layer0.attn_preproj"]
    assert not torch.equal(codes["codes.layer0.attn_preproj"], cosine_ids)


def _codebook_tensors(prefix: str, codes: int, dim: int, gen) -> dict:
    return {f"{prefix}.codebook.weight": torch.randn(codes, dim, generator=gen),
            f"{prefix}.ln.weight": 1 + torch.rand(dim, generator=gen),
            f"{prefix}.ln.bias": torch.randn(dim, generator=gen)}


def test_other_sites_in_the_library_wrapper_layout(tmp_path):
    # The library wraps a module to put a codebook on its output, moving the module's own weights
    # under ".module_layer" (FORMAT.md section 4). GPT-2: attn_preproj + mlp + transformer_block
    # in every layer; GPT-NeoX: attn. Each codebook must land at its site, and every base weight
    # must load (checked through the base logits).
    gen = torch.Generator().manual_seed(0)
    src, base = copy_fixture("gpt2_attn_preproj", tmp_path)
    state = load_file(str(src / "model.safetensors"))
    added = {}
    for i in (0, 1):
        added.update(_codebook_tensors(f"model.transformer.h.{i}.module_layer.mlp.codebook_layer",
                                       32, 32, gen))
        added.update(_codebook_tensors(f"model.transformer.h.{i}.codebook_layer", 32, 32, gen))

    def wrap_gpt2(key):
        key = re.sub(r"(\.h\.\d+)\.", r"\1.module_layer.", key)
        return key.replace(".module_layer.mlp.", ".module_layer.mlp.module_layer.")

    wrapped = {wrap_gpt2(k): t for k, t in state.items()}
    save_file({**wrapped, **added}, str(src / "model.safetensors"))
    edit_json(src / "config.json", codebook_at=["attn_preproj", "mlp", "transformer_block"],
              codebook_type=["group", "vanilla", "vanilla"], num_codebooks=[-1, 1, 1],
              k_codebook=2, num_codes=32)
    gpt2 = load_original(src, base)
    layers = gpt2.codebook_layers()
    assert set(layers) == {(i, s) for i in (0, 1) for s in ("attn_heads", "mlp_out", "block_out")}
    for i in (0, 1):
        for site, prefix in (("mlp_out", f"h.{i}.module_layer.mlp"), ("block_out", f"h.{i}")):
            key = f"model.transformer.{prefix}.codebook_layer"
            assert torch.equal(layers[(i, site)].codebook[0], added[f"{key}.codebook.weight"])
            assert torch.equal(layers[(i, site)].ln_bias[0], added[f"{key}.ln.bias"])
    head2 = state["model.transformer.h.1.attn.codebook_layer.codebook.2.codebook.weight"]
    assert torch.equal(layers[(1, "attn_heads")].codebook[2], head2)

    src, base = copy_fixture("gpt_neox_attn_preproj", tmp_path)
    state = load_file(str(src / "model.safetensors"))
    added = {}
    for i in (0, 1):
        added.update(_codebook_tensors(f"model.gpt_neox.layers.{i}.attention.codebook_layer",
                                       48, 48, gen))
    # The per-head codebooks go: this checkpoint has one codebook on the attention output.
    wrapped = {k.replace(".attention.", ".attention.module_layer."): t for k, t in state.items()
               if ".codebook_layer." not in k}
    save_file({**wrapped, **added}, str(src / "model.safetensors"))
    edit_json(src / "config.json", codebook_at="attn", codebook_type="vanilla", num_codebooks=1)
    neox = load_original(src, base)
    assert set(neox.codebook_layers()) == {(0, "attn_out"), (1, "attn_out")}
    key = "model.gpt_neox.layers.1.attention.codebook_layer.codebook.weight"
    assert torch.equal(neox.codebook_layers()[(1, "attn_out")].codebook[0], added[key])

    for model, name in ((gpt2, "gpt2_attn_preproj"), (neox, "gpt_neox_attn_preproj")):
        exp = expected(name)
        with torch.no_grad(), model.codebooks_disabled():
            assert max_diff(model(exp["input_ids"]).logits, exp["base_logits"]) <= LOGITS_ATOL


# -- weight files -------------------------------------------------------------------------------

# Buffers that older transformers versions put into state dicts, and GPT-2's tied lm_head, which
# pytorch_model.bin files (unlike safetensors) keep as a second key.
OLD_EXTRAS = {
    "gpt2_attn_preproj": lambda sd: {
        "model.transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)),
        "model.transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
        "model.lm_head.weight": sd["model.transformer.wte.weight"].clone(),
    },
    "gpt_neox_mlp": lambda sd: {
        "model.gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(3),
        "model.gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 32, 32),
        "model.gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
    },
}


@pytest.mark.parametrize("name", sorted(OLD_EXTRAS))
def test_pytorch_model_bin_is_read_with_weights_only(tmp_path, name):
    src, base = copy_fixture(name, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state.update(OLD_EXTRAS[name](state))
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    assert_matches_fixture(load_original(src, base), name)


class Payload:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused(tmp_path):
    src, base = copy_fixture("gpt2_mlp", tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"x": torch.zeros(1), "payload": Payload(str(marker))}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="only weights_only=True loading is allowed"):
        load_original(src, base)
    assert not marker.exists()


def test_sharded_safetensors(tmp_path):
    src, base = copy_fixture("gpt_neo_attn_preproj", tmp_path)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(src / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_matches_fixture(load_original(src, base), "gpt_neo_attn_preproj")


# -- conversion ---------------------------------------------------------------------------------


def test_convert_then_load_then_steer(tmp_path, capsys):
    name = "gpt_neo_attn_preproj"
    out = tmp_path / "converted"
    status = main(["convert-original", str(FIXTURES / name / "codebook"),
                   "--base", str(FIXTURES / name / "base"), "--out", str(out)])
    assert status == 0
    assert "attn_heads" in capsys.readouterr().out
    assert (out / "codebook_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_neo"

    model = CodebookModel.from_pretrained(out)
    assert_matches_fixture(model, name)
    ids = expected(name)["input_ids"]
    plain, _ = run(model, ids)
    # Head 1 of layer 0 may use code 5 only: it is chosen everywhere and changes the output.
    with model.steer(Steering(codes=["0:attn_heads:1:5"], mode="replace")):
        steered, codes = run(model, ids)
    assert (codes["codes.layer0.attn_preproj"][:, :, 1, 0] == 5).all()
    assert max_diff(steered, plain) > 1e-3


@pytest.mark.parametrize("name", PER_SITE)
def test_per_site_num_codes_and_k_survive_conversion(tmp_path, capsys, name):
    # The library sets num_codes and k_codebook per entry of codebook_at: each site keeps its own
    # C and k through convert-original, save and load.
    out = tmp_path / "converted"
    assert main(["convert-original", str(FIXTURES / name / "codebook"),
                 "--base", str(FIXTURES / name / "base"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for site, (_, codes, k) in fixture_sites(name).items():
        assert f"{site} {codes} codes k={k}" in printed
    saved = json.loads((out / "codebook_config.json").read_text())
    assert saved["per_site"]  # the sites that differ from the first
    model = CodebookModel.from_pretrained(out)
    assert_sites(model, name)
    assert_matches_fixture(model, name)
    # Steering addresses each site's own code ids: the last code of the mlp site exists there
    # only (C differs), and replacing with it changes the output.
    mlp_codes = model.codebook_config.num_codes_at("mlp_out")
    ids = expected(name)["input_ids"]
    plain, _ = run(model, ids)
    with model.steer(Steering(codes=[f"1:mlp_out:0:{mlp_codes - 1}"], mode="replace")):
        steered, codes = run(model, ids)
    assert (codes["codes.layer1.mlp"][..., 0, 0] == mlp_codes - 1).all()
    assert max_diff(steered, plain) > 1e-3


def test_our_config_keeps_per_site_overrides(tmp_path):
    config = CodebookConfig(sites=["attn_heads", "mlp_out"], num_codes=32, k=2,
                            per_site={"mlp_out": {"num_codes": 48, "k": 3}})
    assert [(config.num_codes_at(s), config.k_at(s)) for s in config.sites] == [(32, 2), (48, 3)]
    config.save(tmp_path)
    assert CodebookConfig.load(tmp_path) == config
    assert "per_site" not in CodebookConfig().to_dict()  # saved configs without it are unchanged
    for per_site, message in (({"block_out": {"k": 1}}, "not one of the sites"),
                              ({"mlp_out": {"codes": 4}}, "unknown keys"),
                              ({"mlp_out": {"k": 33}}, r"k at mlp_out must be between 1 and its "
                                                       r"num_codes \(32\)"),
                              ({"mlp_out": {"num_codes": 1}}, r"between 1 and its num_codes \(1\)"),
                              ({"mlp_out": {"k": 2.5}}, "must be an integer")):
        with pytest.raises(ValueError, match=message):
            CodebookConfig(sites=["attn_heads", "mlp_out"], num_codes=32, k=2, per_site=per_site)


def test_a_per_site_model_exports_and_its_bundle_matches(tmp_path):
    from cbexport import export_bundle
    from tests.test_analysis import word_tokenizer

    model = load_original(FIXTURES / "gpt2_per_site" / "codebook",
                          FIXTURES / "gpt2_per_site" / "base")
    model.tokenizer = word_tokenizer()  # the fixtures have none; the bundle needs one
    manifest = export_bundle(model, tmp_path / "bundle", formats="onnx", optimize=False)
    sites = {(s["layer"], s["site"]): (s["groups"], s["num_codes"], s["k"])
             for s in manifest["sites"]}
    assert sites == {(layer, site): values for layer in (0, 1)
                     for site, values in fixture_sites("gpt2_per_site").items()}
    report = json.loads((tmp_path / "bundle" / "verification.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-4


def test_converter_refuses_to_overwrite_its_source(tmp_path, capsys):
    src, base = copy_fixture("gpt2_mlp", tmp_path)
    before = (src / "model.safetensors").read_bytes()
    assert main(["convert-original", str(src), "--base", str(base), "--out", str(src)]) == 1
    assert "--out must differ" in capsys.readouterr().err
    assert (src / "model.safetensors").read_bytes() == before


def test_converter_reports_bad_input_in_one_line(tmp_path, capsys):
    status = main(["convert-original", str(FIXTURES / "gpt2_mlp" / "codebook"),
                   "--out", str(tmp_path / "out")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "does not name its base model" in err
    assert not (tmp_path / "out").exists()


# -- the Hub ------------------------------------------------------------------------------------

HUB_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file
from codebook import CodebookModel
from codebook.__main__ import main

exp = load_file(sys.argv[1])
results = {}
model = CodebookModel.from_pretrained("orig/cb-neox", base="orig/base-neox")
with torch.no_grad():
    results["diff"] = (model(exp["input_ids"]).logits - exp["logits"]).abs().max().item()
results["status"] = main(["convert-original", "orig/cb-neox", "--base", "orig/base-neox",
                          "--out", sys.argv[2]])
for base in ("orig/missing", None):
    try:
        CodebookModel.from_pretrained("orig/cb-neox", base=base)
    except Exception as err:
        results[str(base)] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


def test_source_and_base_from_the_offline_hub_cache(tmp_path):
    name = "gpt_neox_attn_preproj"
    cache = tmp_path / "hub"
    build_hub_cache(cache, "orig/cb-neox", {"main": FIXTURES / name / "codebook"})
    build_hub_cache(cache, "orig/base-neox", {"main": FIXTURES / name / "base"})
    out = tmp_path / "converted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(FIXTURES / name / "expected.safetensors"), str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["diff"] <= LOGITS_ATOL
    assert results["status"] == 0
    assert results["orig/missing"].startswith("FileNotFoundError: base model orig/missing")
    assert "not in the local Hugging Face cache" in results["orig/missing"]
    assert "does not name its base model" in results["None"]
    assert_matches_fixture(CodebookModel.from_pretrained(out), name)


def test_hub_download_fetches_pytorch_model_bin_only_when_needed(tmp_path, monkeypatch):
    # A stand-in for the Hub that, like snapshot_download, fetches only the files matching
    # allow_patterns: the .bin-only checkpoint loads only if the loader asks for *.bin.
    name = "gpt2_attn_preproj"
    bin_repo = tmp_path / "bin-repo"
    bin_repo.mkdir()
    shutil.copy(FIXTURES / name / "codebook" / "config.json", bin_repo)
    torch.save(load_file(str(FIXTURES / name / "codebook" / "model.safetensors")),
               bin_repo / "pytorch_model.bin")
    repos = {"orig/cb-bin": bin_repo, "orig/cb": FIXTURES / name / "codebook",
             "orig/base": FIXTURES / name / "base"}
    requests = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, token=None,
                          repo_type="model"):
        assert repo_type == "model"
        requests.append((repo_id, allow_patterns))
        snapshot = tmp_path / "snapshots" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert_matches_fixture(CodebookModel.from_pretrained("orig/cb-bin", base="orig/base"), name)
    assert_matches_fixture(CodebookModel.from_pretrained("orig/cb", base="orig/base"), name)
    asked_for_bin = {repo for repo, patterns in requests if "pytorch_model*.bin" in patterns}
    assert asked_for_bin == {"orig/cb-bin"}
    # The base model's weights are never needed (the checkpoint has them all): not fetched.
    assert not (tmp_path / "snapshots" / "orig--base" / "model.safetensors").exists()


POLICY_SCRIPT = """
import json, sys
from pathlib import Path
from app.models import ModelRegistry
from app.settings import Settings

results = {}
for name in sys.argv[2:]:
    registry = ModelRegistry(Settings(model="default", model_roots=(Path(sys.argv[1]).resolve(),)))
    try:
        results[name] = type(registry.load_for_visitor(name).model).__name__
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


def test_a_visitors_hub_repo_cannot_choose_its_base(tmp_path):
    # A visitor's Hub repo names its base model in config.json: the app never follows it, be it a
    # Hub id, a directory inside the allowed roots, or one outside them (only the paper's released
    # models open without a base, from the table in codebook.original: tests/
    # test_known_originals.py). The refusal comes before the name is resolved, and shows nothing
    # read from a local directory.
    from tests.test_analysis import word_tokenizer

    fixture = FIXTURES / "gpt2_mlp"

    def base_copy(directory: Path) -> str:
        shutil.copytree(fixture / "base", directory)
        word_tokenizer().save_pretrained(directory)
        return str(directory)

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "config.json").write_text(json.dumps({"model_type": "s3cr3t-model-type"}))
    work = tmp_path / "work"
    base_copy(work / "owner" / "base")  # a repo-id-shaped path beside the server
    cache = tmp_path / "hub"
    build_hub_cache(cache, "orig/base", {"main": Path(base_copy(tmp_path / "hub-base"))})
    bases = {
        "visitor/outside": base_copy(tmp_path / "outside" / "base"),
        "visitor/secret": str(secret),
        "visitor/relative": "owner/base",
        "visitor/dotdot": "../outside/base",
        "visitor/home": "~",
        "visitor/hub": "orig/base",
        "visitor/allowed": base_copy(tmp_path / "models" / "base"),
    }
    for repo, base in bases.items():
        src = tmp_path / "repos" / repo
        shutil.copytree(fixture / "codebook", src)
        edit_json(src / "config.json", base_model_name_or_path=base)
        build_hub_cache(cache, repo, {"main": src})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", POLICY_SCRIPT, str(tmp_path / "models"), *bases],
                          env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(bases)
    for repo, message in results.items():
        assert message.startswith(f"ModelError: cannot load {repo!r}: {repo} is a checkpoint "
                                  "of the original codebook-features library that this server "
                                  "does not know: a repo cannot choose the base model"), message
        assert "s3cr3t" not in message and bases[repo] not in message


# -- bad input ----------------------------------------------------------------------------------


def _config(**changes):
    return lambda src, base: (edit_json(src / "config.json", **changes), (src, base))[1]


def _base_vocab(src, base):
    edit_json(base / "config.json", vocab_size=100)
    return src, base


def _no_weights(src, base):
    (src / "model.safetensors").unlink()
    return src, base


def _other_family(src, base):
    return src, FIXTURES / "gpt_neo_mlp" / "base"


BAD_INPUTS = {
    "qkv site": ("gpt2_attn_preproj", _config(codebook_at=["qkv"]), ValueError,
                 r"codebook_at 'qkv' \(codebooks on the query/key/value projections\) is not "
                 r"supported; supported sites: attn_preproj, attn, mlp, transformer_block"),
    "unknown site": ("gpt2_mlp", _config(codebook_at="residual"), ValueError,
                     r"unknown codebook_at 'residual'"),
    "codebook type": ("gpt2_attn_preproj", _config(codebook_type=["grouped"]), ValueError,
                      r"codebook_type 'grouped' is not supported; supported: vanilla, group"),
    "vanilla per-head": ("gpt2_attn_preproj",
                         _config(codebook_type=["vanilla"], num_codebooks=[1]), ValueError,
                         r"a vanilla codebook with num_codebooks=1 at 'attn_preproj' is not "
                         r"supported; at 'attn_preproj' we support one codebook per attention"),
    "group mlp": ("gpt2_mlp", _config(codebook_type=["group"], num_codebooks=[4]), ValueError,
                  r"num_codebooks=4 at 'mlp' is not supported"),
    "per-site k above C": ("gpt2_per_site", _config(k_codebook=[2, 49]), ValueError,
                           r"k_codebook 49 at 'mlp' must be between 1 and its num_codes 48"),
    "per-site lengths": ("gpt2_per_site", _config(num_codes=[32, 48, 64]), ValueError,
                         r"num_codes has 3 entries for 2 codebook sites"),
    "similarity": ("gpt2_mlp", _config(similarity_metric="cosine"), ValueError,
                   r"similarity_metric 'cosine' is not supported"),
    "soft snap": ("gpt2_mlp", _config(codebook_kwargs={"soft_snap": True}), ValueError,
                  r"codebook_kwargs \{'soft_snap': True\} are not supported"),
    "missing base": ("gpt2_mlp", lambda src, base: (src, None), ValueError,
                     r"does not name its base model .* pass the base model"),
    "base not found": ("gpt2_mlp", lambda src, base: (src, base.parent / "nope"),
                       FileNotFoundError, r"base model .*nope: model directory not found"),
    "base is a codebook model": ("gpt2_mlp", lambda src, base: (src, src), ValueError,
                                 r"is itself an original codebook checkpoint"),
    "other family": ("gpt2_mlp", _other_family, ValueError,
                     r"was made for a gpt2 base model \(GPT2CodebookModel\), but base model "
                     r".* is 'gpt_neo'"),
    "base shapes": ("gpt2_mlp", _base_vocab, ValueError,
                    r"does not fit base model .*: transformer.wte.weight has shape \(128, 32\) in "
                    r"the checkpoint but \(100, 32\) in the base config"),
    "codebook shapes": ("gpt2_attn_preproj", _config(num_codes=[16]), ValueError,
                        r"codebook.0.codebook.weight has shape \(32, 8\), config.json and the "
                        r"base model give \(16, 8\)"),
    "fewer layers": ("gpt2_attn_preproj", _config(layers_to_snap=[0]), ValueError,
                     r"codebook weights that config.json does not describe .*h.1.attn"),
    "more layers": ("gpt2_mlp", _config(layers_to_snap=[0, 1]), ValueError,
                    r"no weights 'transformer.h.0.mlp.codebook_layer.codebook.weight'"),
    "no weights": ("gpt2_mlp", _no_weights, FileNotFoundError, r"has no weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error(tmp_path, case):
    name, prepare, error, message = BAD_INPUTS[case]
    src, base = prepare(*copy_fixture(name, tmp_path))
    with pytest.raises(error, match=message):
        CodebookModel.from_pretrained(src, base=base)


def test_base_is_refused_for_a_model_in_our_format(tmp_path):
    tiny_model("gpt2", sites=["mlp_out"]).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="base= is only for checkpoints of the original"):
        CodebookModel.from_pretrained(tmp_path / "ours", base=FIXTURES / "gpt2_mlp" / "base")
