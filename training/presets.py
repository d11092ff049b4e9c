"""Named finetuning recipes. ``stories260k`` is the embedded default model of the project's first
releases (stories260K with codebooks); today's default model is made by ``python -m training
build-default`` (training/build.py).

Paths are relative to the repository root, where ``python -m training`` runs.
"""

from __future__ import annotations

from pathlib import Path

SHARED = "../shared"
TINYSTORIES = f"{SHARED}/data/tinystories"

PRESETS: dict[str, dict] = {
    # Karpathy's stories260K (pretrained on all of TinyStories) with a codebook on every
    # attention head of every layer; training/stories260k_notes.md has the measurements behind
    # each choice.
    "stories260k": {
        "base": f"llama2c:{SHARED}/models/stories260K/stories260K.bin",
        "data": [f"{TINYSTORIES}/tinystories_v1_train_prefix_2MiB.txt",
                 f"{TINYSTORIES}/tinystories_v2_train_prefix_10k_lines.txt"],
        # Checkpoints go under the run's output (OUTPUT/checkpoints, git-ignored here), so a run
        # with another --output never meets this one's checkpoints.
        "output": "runs/stories260k",
        "card_notes": "training/stories260k_notes.md",
        "val_fraction": 0.05,
        "block_size": 256,
        "sites": ["attn_heads"],
        "num_codes": 512,
        "k": 8,
        "similarity": "cosine",
        "combine": "sum",
        "kmeans_init": True,
        "dead_code_steps": 50,
        "lr_base": 3e-4,
        "lr_codebook": 3e-3,
        "warmup_steps": 50,
        "schedule": "cosine",
        "batch_size": 16,
        "epochs": 2.5,
        "eval_every": 100,
        "eval_tokens": 16384,
        "checkpoint_every": 100,
        "seed": 0,
        # One thread: on a 2-core machine shared with other work, two threads ran 6x slower.
        "threads": 1,
    },
}


def preset(name: str) -> dict:
    """The options of preset ``name``, after checking that the files it reads exist."""
    try:
        options = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
    files = list(options.get("data", [])) + [options.get("card_notes") or ""]
    base = options.get("base", "")
    if base.startswith("llama2c:"):
        files.append(base.removeprefix("llama2c:"))
    missing = [f for f in files if f and not Path(f).exists()]
    if missing:
        raise FileNotFoundError(
            f"preset {name!r} reads {missing}, which do not exist here: run it from the "
            f"repository root, with the shared material in {SHARED}"
        )
    return options
