"""Training checkpoints: written atomically, in safetensors and JSON only (no pickle).

A checkpoint is a directory ``step-NNNNNNNN`` holding the model (base and codebooks, with the
code-usage counts), the optimizer moments, the code-usage tracker and a JSON file with everything
else (step, scheduler, optimizer hyper-parameters, recipe). It is written under a temporary name
and renamed into place, then the ``latest`` pointer file is replaced atomically, so an interrupted
write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
USAGE_FILE = "code_usage.safetensors"
STATE_FILE = "trainer_state.json"


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    usage_state: dict[str, torch.Tensor],
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` under ``directory`` and keep only the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    if usage_state:
        save_file({k: v.contiguous().cpu() for k, v in usage_state.items()}, str(tmp / USAGE_FILE))
    full_state = dict(state, step=step, optimizer=optimizer_meta,
                      scheduler=scheduler.state_dict())
    _write_text_atomically(tmp / STATE_FILE, json.dumps(full_state, indent=2))
    for file in tmp.iterdir():  # contents on disk before the rename makes them visible
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # a checkpoint of the same step from an abandoned run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomically(directory / LATEST, final.name + "\n")
    _fsync(directory)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer and scheduler in place; returns ``(state, usage_state)``."""
    state = read_state(path)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=True,
                                     device=str(device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    tensors = load_file(str(path / OPTIMIZER_FILE), device=str(device))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    usage_file = path / USAGE_FILE
    usage_state = load_file(str(usage_file), device=str(device)) if usage_file.is_file() else {}
    return state, usage_state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into named tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
