"""Loading from the Hugging Face Hub through its offline cache, and pushing to it."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, ModelCard

from tests.test_model import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def build_hub_cache(cache: Path, repo_id: str, revisions: dict[str, Path],
                    repo_type: str = "model") -> None:
    """Lay out a repo in huggingface_hub's cache format (refs → snapshots/<commit>), copying each
    revision's files (subfolders included) from its source folder."""
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for revision, source in revisions.items():
        commit = COMMITS[revision]
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in source.rglob("*"):
            if file.is_file():
                target = snapshot / file.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())


LOADER = """
import json, sys, torch
from codebook import CodebookModel
results = {}
for name in sys.argv[1:]:
    try:
        model = CodebookModel.from_pretrained(name)
        results[name] = model.codebook_config.num_codes
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


def test_from_pretrained_reads_the_offline_hub_cache(tmp_path):
    for num_codes, revision in ((16, "main"), (24, "v1")):
        tiny_model("gpt2", sites=["mlp_out"], num_codes=num_codes).save_pretrained(
            tmp_path / revision
        )
    cache = tmp_path / "hub"
    build_hub_cache(cache, "someone/tiny-codebook",
                    {"main": tmp_path / "main", "v1": tmp_path / "v1"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    names = ["someone/tiny-codebook", "someone/tiny-codebook@v1", "someone/missing",
             "someone/tiny-codebook@v2"]
    proc = subprocess.run([sys.executable, "-c", LOADER, *names], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["someone/tiny-codebook"] == 16
    assert results["someone/tiny-codebook@v1"] == 24
    for missing in ("someone/missing", "someone/tiny-codebook@v2"):
        assert results[missing].startswith("FileNotFoundError"), results[missing]
        assert "not in the local Hugging Face cache" in results[missing]


def test_push_to_hub_uploads_a_complete_model_directory(monkeypatch):
    calls, cards = [], []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload_folder", repo_id, files, kwargs))
        cards.append(ModelCard.load(Path(folder_path) / "README.md"))
        return f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = tiny_model("llama", sites=["attn_heads"]).push_to_hub("me/tiny", private=True)
    assert url.endswith("c" * 40)
    assert calls[0] == ("create_repo", "me/tiny",
                        {"private": True, "exist_ok": True, "repo_type": "model"})
    _, repo_id, files, kwargs = calls[1]
    assert repo_id == "me/tiny" and kwargs["repo_type"] == "model"
    assert {"config.json", "model.safetensors", "codebook_config.json",
            "codebooks.safetensors", "README.md"} <= set(files)
    # A card that says what the model is; the tiny base is local, so no base_model.
    card = cards[0]
    assert card.data.tags == ["codebook-features", "interpretability"]
    assert card.data.base_model is None and "a Llama base" in card.text
    assert 'CodebookModel.from_pretrained("me/tiny")' in card.text
    model = tiny_model("llama", sites=["attn_heads"])
    model.base.config._name_or_path = "someone/tiny-llama"
    model.push_to_hub("me/tiny")
    assert cards[1].data.base_model == "someone/tiny-llama"
    model.push_to_hub("me/tiny", card="# mine\n")
    assert cards[2].text.strip() == "# mine"


# -- the app's download bound -------------------------------------------------------------------

MB = 2**20
COMMIT = "c" * 40


class FakeHub:
    """The Hub's metadata and downloads for ``repos`` (``{repo_id: {filename: content}}``; content
    is bytes, or an int: a file of that many bytes, or ``None``: a file whose size the Hub does not
    report). Like ``snapshot_download`` it fetches only the files matching ``allow_patterns``, into
    one snapshot folder per repo; ``fetched`` records every file really downloaded. With
    ``metadata_up=False`` the Hub's metadata calls fail while downloads would still work."""

    def __init__(self, root: Path, repos: dict[str, dict]):
        self.root, self.repos = root, repos
        self.fetched: list[tuple[str, str, int]] = []
        self.metadata_up = True

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    @staticmethod
    def size(content) -> int | None:
        return len(content) if isinstance(content, bytes) else content

    def files(self, repo_id, allow_patterns):
        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in self.repos:
            raise RepositoryNotFoundError(f"{repo_id} not found", response=_response(404))
        return {f: c for f, c in self.repos[repo_id].items()
                if allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns)}

    def model_info(self, api, repo_id, revision=None, files_metadata=False, **kwargs):
        if not self.metadata_up:
            raise ConnectionError("the Hub's API is down")
        siblings = [SimpleNamespace(rfilename=f, size=self.size(c))
                    for f, c in self.files(repo_id, None).items()]
        return SimpleNamespace(id=repo_id, sha=COMMIT, siblings=siblings)

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, token=None,
                          repo_type="model", dry_run=False, local_files_only=False, **kwargs):
        from huggingface_hub import DryRunFileInfo
        from huggingface_hub.errors import DryRunError, LocalEntryNotFoundError

        folder = self.folder(repo_id)
        if dry_run:
            if not self.metadata_up:
                raise DryRunError("the Hub cannot be reached") from ConnectionError("API down")
            return [DryRunFileInfo(commit_hash=COMMIT, file_size=self.size(c), filename=f,
                                   local_path=str(folder / f), is_cached=(folder / f).exists(),
                                   will_download=not (folder / f).exists())
                    for f, c in self.files(repo_id, allow_patterns).items()]
        wanted = self.files(repo_id, allow_patterns)
        if local_files_only:
            if not all((folder / f).exists() for f in wanted):
                raise LocalEntryNotFoundError(f"{repo_id} is not fully cached")
            return str(folder)
        for f, content in wanted.items():
            if (folder / f).exists():
                continue
            data = content if isinstance(content, bytes) else b"\0" * (content or 1)
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_bytes(data)
            self.fetched.append((repo_id, f, len(data)))
        return str(folder)


PAPERS_MODEL = "taufeeque/TinyStories-1Layer-21M-Codebook"


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co"))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub with: a small model of ours, the same with a large file of each kind the app
    fetches, an original checkpoint whose weights are a large pytorch_model.bin, one of the paper's
    models whose base model has a large tokenizer file, and a file of unknown size."""
    import huggingface_hub

    from tests.test_analysis import word_tokenizer

    model = tiny_model("gpt2", sites=["mlp_out"], num_codes=16)
    model.tokenizer = word_tokenizer()
    model.save_pretrained(tmp_path / "small")
    small = _files(tmp_path / "small")
    original = REPO_ROOT / "tests" / "fixtures" / "original" / "gpt2_mlp"
    config = json.loads((original / "codebook" / "config.json").read_text())
    neo = original.parent / "gpt_neo_mlp"
    repos = {
        "ok/small": small,
        "big/npz": {**small, "index.npz": 3 * MB},
        "big/png": {**small, "plot.png": 3 * MB},
        "big/json": {**small, "tokenizer_extra.json": 3 * MB},
        "big/txt": {**small, "merges.txt": 3 * MB},
        "unknown/size": {**small, "codes.npz": None},
        "orig/bin": {"config.json": json.dumps({**config, "base_model_name_or_path":
                                                "orig/base"}).encode(),
                     "pytorch_model.bin": 3 * MB},
        # One of the paper's models, whose base (from the table in codebook.original) is large.
        PAPERS_MODEL: _files(neo / "codebook"),
        "roneneldan/TinyStories-1Layer-21M": {**_files(neo / "base"), "vocab.txt": 3 * MB},
        "orig/base": _files(original / "base"),
    }
    hub = FakeHub(tmp_path / "fake-hub", repos)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(HfApi, "model_info",
                        lambda api, repo_id, **kw: hub.model_info(api, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return hub


def _registry(max_model_mb: int = 1):
    from app.models import ModelRegistry
    from app.settings import Settings

    return ModelRegistry(Settings(model="default", max_model_mb=max_model_mb, device="cpu"))


@pytest.mark.parametrize("repo", ["big/npz", "big/png", "big/json", "big/txt", "orig/bin",
                                  PAPERS_MODEL])
def test_the_app_counts_every_file_it_would_fetch_against_its_limit(fake_hub, repo):
    from app.models import ModelError

    with pytest.raises(ModelError, match=r"MB \(largest: [\w.]+ 3\.0 MB\), over the limit of "
                                         r"1 MB"):
        _registry().load_for_visitor(repo)
    # Refused before the large file was fetched; at most the small files before it (an original
    # checkpoint's config, read to learn that its weights are a .bin or which base it needs).
    assert all(size < MB for _, _, size in fake_hub.fetched), fake_hub.fetched


def test_the_app_loads_a_model_within_its_limit(fake_hub):
    loaded = _registry().load_for_visitor("ok/small")
    assert loaded.model.codebook_config.num_codes == 16
    assert {f for _, f, _ in fake_hub.fetched} >= {"model.safetensors", "codebooks.safetensors",
                                                   "tokenizer.json"}


def test_the_app_refuses_files_of_unknown_size(fake_hub):
    from app.models import ModelError

    with pytest.raises(ModelError, match="does not report the size of codes.npz"):
        _registry().load_for_visitor("unknown/size")
    assert fake_hub.fetched == []


def test_when_the_hub_cannot_give_sizes_only_the_cache_is_read(fake_hub):
    from app.models import ModelError

    fake_hub.metadata_up = False
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        _registry().load_for_visitor("ok/small")
    assert fake_hub.fetched == []
    fake_hub.metadata_up = True
    _registry().load_for_visitor("ok/small")  # now cached ...
    fake_hub.metadata_up = False
    assert _registry().load_for_visitor("ok/small").model is not None  # ... so it loads


def test_offline_the_cached_files_count_against_the_limit(fake_hub, monkeypatch):
    import huggingface_hub

    from app.models import ModelError

    _registry(max_model_mb=10).load_for_visitor("big/npz")  # cached under a larger limit
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub.metadata_up = False
    with pytest.raises(ModelError, match=r"index.npz 3\.0 MB\), over the limit of 1 MB"):
        _registry().load_for_visitor("big/npz")
    assert _registry(max_model_mb=10).load_for_visitor("big/npz").model is not None
