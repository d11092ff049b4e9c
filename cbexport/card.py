"""The bundle's model card (``README.md``): what is inside and how to run and steer it.

Its front matter is written through ``huggingface_hub``'s ``ModelCardData``: the bundle's tags,
and the ``license``, ``base_model`` and ``datasets`` that :func:`source_metadata` carries over
from the exported model.
"""

from __future__ import annotations

from cbexport import manifest as mf

TAGS = ["codebook-features", "onnx", "text-generation", "steering"]


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def source_metadata(source_card: dict, source_repo: str | None) -> dict:
    """The card metadata a bundle inherits from the model it was exported from: that model's
    ``license`` and ``datasets`` (from its card, ``source_card``), and as ``base_model`` the
    model itself when it is a Hub repo (``source_repo``: the bundle is a conversion of it), else
    its own ``base_model``."""
    return {"license": source_card.get("license"),
            "base_model": source_repo or source_card.get("base_model"),
            "datasets": source_card.get("datasets")}


def model_card(manifest: dict, report: dict, metadata: dict | None = None) -> str:
    """The card's text; ``metadata``: ``ModelCardData`` fields besides the tags (see
    :func:`source_metadata`)."""
    from codebook.hub import model_card as card_with_metadata  # torch: only exports write cards

    model, cb, sites = manifest["model"], manifest["codebook"], manifest["sites"]
    example = sites[0]
    code = f"{example['layer']}:{example['site']}:0:0"
    lines = [
        f"# Codebook model bundle: {manifest['source']}",
        "",
        f"A {model['model_type']} causal language model ({model['num_layers']} layers, vocabulary "
        f"{model['vocab_size']}) whose hidden states pass through sparse discrete codebooks "
        "(Tamkin, Taufeeque & Goodman 2023, *Codebook Features*): each activation is replaced by "
        f"the {cb['combine']} of its top-{cb['k']} most similar codes ({cb['similarity']} "
        "similarity). Forcing codes on steers what the model writes.",
        "",
        "## Files",
        "",
        "| file | size | what |",
        "|---|---|---|",
    ]
    about = {
        mf.FILES["onnx"]: "decoder with KV cache and steering inputs; each codebook is one "
                          "`codebook::TopKCodebook` node whose definition is in the file",
        mf.FILES["torchscript"]: "traced decoder (same inputs) for torch users",
        mf.FILES["torchscript_op"]: "registers `codebook::topk_codebook` with plain torch",
        mf.FILES["tokenizer"]: "tokenizer (Hugging Face `tokenizers` format)",
        mf.FILES["topics"]: "topic presets: codes to steer towards each topic",
        mf.MANIFEST: "manifest: shapes, codebook sites, tensor names",
        mf.FILES["verification"]: "comparison with the torch model",
        mf.FILES["card"]: "this card",
    }
    for name, size in manifest["file_sizes"].items():
        lines.append(f"| `{name}` | {human_size(size)} | {about.get(name, '')} |")
    lines += [
        "",
        "## Codebooks",
        "",
        "| layer | site | codebooks (heads) | codes each | active (k) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['layer']} | {s['site']} | {s['groups']} | {s['num_codes']} | {s['k']} |"
              for s in sites]
    if manifest["topics"]:
        lines += ["", "Topic presets: " + ", ".join(f"`{t}`" for t in manifest["topics"]) + "."]
    lines += [
        "",
        "## Run it (onnxruntime, numpy and tokenizers; no torch needed)",
        "",
        "The runtime is the `cbexport` package of the codebook-features project; it needs only "
        "onnxruntime, numpy and tokenizers, so install the project without its dependencies:",
        "",
        "```bash",
        "pip install onnxruntime numpy tokenizers   # onnxruntime-gpu for CUDA",
        "pip install --no-deps /path/to/codebook-features-checkout",
        'python -m cbexport.run --bundle . --prompt "Once upon a time" --max-new-tokens 60',
        f'python -m cbexport.run --bundle . --prompt "Once upon a time" --codes {code} '
        "--strength 2",
    ]
    if manifest["topics"]:
        lines.append(f'python -m cbexport.run --bundle . --prompt "Once upon a time" '
                     f"--steer {manifest['topics'][0]}")
    lines += [
        "```",
        "",
        "From Python:",
        "",
        "```python",
        "from cbexport.runtime import CodebookRuntime",
        'rt = CodebookRuntime(".")',
        'print(rt.generate_text("Once upon a time", max_new_tokens=60))',
        f'steer = rt.steering(codes="{code}", strength=2.0)',
        'print(rt.generate_text("Once upon a time", max_new_tokens=60, steering=steer))',
        "```",
        "",
        "Codes are written `LAYER:SITE:HEAD:CODE`. `--mode replace` makes the forced codes the "
        "only active ones of their head; `--positions prompt|generated` limits steering to the "
        "prompt or to the generated tokens.",
        "",
        "## Steering inputs of the ONNX decoder",
        "",
        "Besides `input_ids`, `attention_mask` (`[batch, past + seq]`), `position_ids` and the "
        "cache (`past_key_values.N.key/value` in, `present.N.key/value` out, "
        f"`[batch, {model['kv_heads']}, length, {model['head_dim']}]`), every codebook site has "
        "two inputs of shape `[heads, codes]`:",
        "",
        "* `steer.LAYER.SITE.bias`: added to the code scores before the top-k. 0: no effect; "
        "`+inf`: the code is always selected; `-inf`: it never is.",
        "* `steer.LAYER.SITE.scale`: multiplies each selected code's vector (the steering "
        "strength). 1: no effect.",
        "",
        "Feed zeros and ones to run unsteered; change them between calls to steer without "
        "re-exporting. The outputs `codes.LAYER.SITE` (`[batch, seq, heads, k]`, int64) are the "
        "codes each token activated.",
        "",
    ]
    if "torchscript" in manifest["formats"]:
        lines += [
            "## TorchScript",
            "",
            "```python",
            "import torch",
            "import codebook_op  # registers the op (skip it if the codebook package is imported)",
            f'decoder = torch.jit.load("{mf.FILES["torchscript"]}")',
            "```",
            "",
            "Same inputs and outputs as the ONNX decoder, in the order listed in "
            f"`{mf.MANIFEST}`. TorchScript is code: only load files you trust.",
            "",
        ]
    verdict = "passed" if report["passed"] else "FAILED"
    ties = (f"; {report['near_ties']} check(s) differed only through a near-tie between two "
            "codes, which torch and onnxruntime may break differently" if report["near_ties"]
            else "")
    lines += [
        "## Verification",
        "",
        f"{'Full' if report['full'] else 'Quick'} comparison with the torch model: {verdict}; "
        f"largest logit difference {report['max_abs_diff']:.2e} (tolerance "
        f"{report['tolerance']:.0e}){ties}. Details in `{mf.FILES['verification']}`.",
        "",
    ]
    return card_with_metadata("\n".join(lines), **(metadata or {}), tags=TAGS,
                              pipeline_tag="text-generation")
