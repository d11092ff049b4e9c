"""Loading from the Hugging Face Hub through its offline cache, and pushing to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from huggingface_hub import HfApi

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
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload_folder", repo_id, files, kwargs))
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
            "codebooks.safetensors"} <= set(files)
