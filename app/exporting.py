"""The Export tab's work: an ONNX and/or TorchScript bundle of the model, zipped for download.

The export runs ``python -m cbexport`` in a subprocess, not in the server: tracing and exporting
take a minute of CPU and much memory, and torch's export machinery shares process-wide state with
the forward passes other visitors' requests run meanwhile. Its log lines drive the progress bar.

Bundles are built once per model (its directory and weight files' sizes and times) and choice of
formats and verification, under the app's own temporary directory, the only place the app serves
files from. Two visitors asking for the same bundle at once wait for one build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

from app.inputs import InputError
from app.models import LoadedModel

FORMATS = ("onnx", "torchscript")
# Where the ``cbexport`` package lives, for the export subprocess.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# cbexport's log lines that start each step: the fraction of the progress bar then reached, and
# what the visitor reads (the lines themselves name folders on the server).
_STEPS = (("loaded", 0.1, "model loaded"), ("exporting ONNX", 0.2, "exporting ONNX"),
          ("tracing TorchScript", 0.5, "tracing TorchScript"),
          ("verifying", 0.7, "verifying against the torch model"),
          ("wrote", 0.95, "writing the bundle"))


@dataclasses.dataclass
class ExportResult:
    zip_path: Path
    manifest: dict
    verification: dict
    cached: bool


def parse_formats(choice) -> list[str]:
    """``"onnx"``, ``"torchscript"``, ``"both"`` or a list of formats → the formats, in order."""
    if isinstance(choice, str):
        names = list(FORMATS) if choice.strip().lower() == "both" else choice.split(",")
    elif isinstance(choice, list | tuple):
        names = list(choice)
    else:
        names = [choice] if choice else []
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise InputError(f"choose the export format: onnx, torchscript or both (got {choice!r})")
    return [f for f in FORMATS if f in names]


def progress_step(line: str) -> tuple[float, str] | None:
    """The progress (fraction, description) a cbexport log line reports, or ``None``."""
    for prefix, fraction, description in _STEPS:
        if line.startswith(prefix):
            return fraction, description
    return None


def _model_key(loaded: LoadedModel) -> str:
    files = sorted(p for p in loaded.directory.iterdir() if p.suffix in (".safetensors", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps([str(loaded.directory), stamp])


def _slug(name: str) -> str:
    """A file name for the model: a Hub id's owner-name, a local directory's own name."""
    if name.startswith(("/", "~", ".")):
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60] or "model"


class ExportCache:
    """Bundles and their zips under ``root`` (the app's temporary directory)."""

    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def build(self, loaded: LoadedModel, formats: list[str], full_verify: bool,
              progress: Callable[[float, str], None] = lambda fraction, message: None,
              ) -> ExportResult:
        key = hashlib.sha256(
            json.dumps([_model_key(loaded), formats, full_verify]).encode()
        ).hexdigest()[:16]
        folder = self.root / key
        zip_path = folder / f"{_slug(loaded.label)}-{'-'.join(formats)}.zip"
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if zip_path.is_file():
                return self._result(folder, zip_path, cached=True)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                _export(loaded.directory, folder / "bundle", formats, full_verify, progress)
            except InputError as err:  # cbexport names folders: say the model's name instead
                message = str(err).replace(str(loaded.directory), loaded.label)
                raise InputError(message.replace(str(folder / "bundle"), "the bundle")) from None
            partial = zip_path.with_suffix(".partial")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted((folder / "bundle").iterdir()):
                    archive.write(file, f"{zip_path.stem}/{file.name}")
            partial.rename(zip_path)  # only a complete zip is ever found by the cache check
            return self._result(folder, zip_path, cached=False)

    @staticmethod
    def _result(folder: Path, zip_path: Path, cached: bool) -> ExportResult:
        bundle = folder / "bundle"
        return ExportResult(
            zip_path=zip_path,
            manifest=json.loads((bundle / "bundle.json").read_text()),
            verification=json.loads((bundle / "verification.json").read_text()),
            cached=cached,
        )


def _export(directory: Path, out: Path, formats: list[str], full_verify: bool,
            progress: Callable[[float, str], None]) -> None:
    """Run ``python -m cbexport`` on ``directory``; raise :class:`InputError` with its message
    when it fails."""
    command = [sys.executable, "-m", "cbexport", "--model", str(directory), "--format",
               ",".join(formats), "--out", str(out), "--force"] + (["--verify"] * full_verify)
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line.strip())
        step = progress_step(line)
        if step is not None:
            progress(*step)
    if proc.wait() != 0:
        errors = [line for line in lines if line.startswith("error:")] or lines[-3:]
        raise InputError(f"export failed: {' '.join(errors).removeprefix('error: ')}")


def usage_snippet(result: ExportResult, steering_codes: list[str]) -> str:
    """How to run the downloaded bundle, steering with the visitor's codes (or a topic)."""
    folder = result.zip_path.stem
    lines = ["# pip install onnxruntime numpy tokenizers, and the codebook-features project",
             f"# unzip {result.zip_path.name}", ""]
    if "onnx" in result.manifest["formats"]:
        lines += ["from cbexport.runtime import CodebookRuntime", "",
                  f'runtime = CodebookRuntime("{folder}")',
                  'print(runtime.generate_text("Once upon a time,", max_new_tokens=80))']
        if steering_codes:
            lines.append(f'steering = runtime.steering(codes="{",".join(steering_codes)}")')
        elif result.manifest.get("topics"):
            lines.append(f'steering = runtime.steering(topic="{result.manifest["topics"][0]}")')
        else:
            lines.append('steering = None  # runtime.steering(codes="LAYER:SITE:HEAD:CODE")')
        lines.append('print(runtime.generate_text("Once upon a time,", max_new_tokens=80, '
                     "steering=steering))")
    else:
        lines += ["import torch", f"import sys; sys.path.insert(0, \"{folder}\")",
                  "import codebook_op  # registers the codebook op with plain torch",
                  f'decoder = torch.jit.load("{folder}/model.torchscript.pt")',
                  f"# inputs and outputs: see {folder}/README.md"]
    return "\n".join(lines)
