"""The Export tab: build an ONNX and/or TorchScript bundle of the session's model (with a progress
bar; built once per model and format), download it as a zip, see how it was verified against the
torch model and how to run it."""

from __future__ import annotations

import gradio as gr

from app import inputs
from app.errors import endpoint
from app.exporting import parse_formats, usage_snippet
from app.tabs import AppContext
from app.tabs.steer import SteerTab

FORMAT_CHOICES = [("ONNX", "onnx"), ("TorchScript", "torchscript"), ("Both", "both")]


def verification_markdown(report: dict, cached: bool, file_name: str = "") -> str:
    verdict = "passed" if report.get("passed") else "FAILED"
    lines = [(f"`{file_name}`: " if file_name else "")
             + f"**Verification {verdict}** against the torch model"
             + (" (bundle from the cache)." if cached else ".")]
    for check in report.get("checks", []):
        # Words, not emoji: a browser without an emoji font shows boxes.
        mark = "passed" if check.get("passed") else "**FAILED**"
        detail = ""
        if "max_abs_diff" in check:
            detail = f" (max |Δ logits| {check['max_abs_diff']:.2e})"
        lines.append(f"- {mark}: {check['name']}{detail}")
    return "\n".join(lines)


def build(ctx: AppContext, steer: SteerTab) -> None:
    gr.Markdown("Export the model to run without this app: **ONNX** (onnxruntime, no torch "
                "needed; steering is an input of the graph) or **TorchScript**. The bundle holds "
                "the model, its tokenizer, topic presets, a model card and a verification report.",
                elem_classes="hint")
    with gr.Row(equal_height=False):
        formats = gr.Radio(FORMAT_CHOICES, value="onnx", label="Format", scale=2)
        full = gr.Checkbox(False, label="Full verification",
                           info="Also compares 64 greedy tokens and steered generation (slower)",
                           scale=2)
        build_button = gr.Button("Build bundle", variant="primary", scale=1)
    download = gr.DownloadButton("Download zip", visible=False, variant="primary")
    # Gradio draws the progress bar over an output; this one is always visible.
    report = gr.Markdown("Choose a format and press **Build bundle**: about a minute on a CPU, "
                         "then the bundle is kept for everyone.", min_height=80)
    snippet = gr.Code(language="python", label="Use it", visible=False, buttons=["copy"])

    # No @gpu: cbexport exports a float32 copy of the model on the CPU. gr.Progress() as a
    # default argument is how Gradio injects its progress tracker.
    # Plain values for API clients (the file, the report, the snippet); the browser then shows
    # the download button and the snippet.
    def export(choice, full_now, model_name, codes, progress=gr.Progress()):  # noqa: B008
        loaded = ctx.model(model_name)
        chosen = parse_formats(choice)
        full_verify = inputs.flag(full_now, "full verification")
        codes = inputs.code_list(codes)
        progress(0.02, desc="starting the export")
        result = ctx.exports.build(loaded, chosen, full_verify,
                                   lambda fraction, message: progress(fraction, desc=message))
        return (str(result.zip_path),
                verification_markdown(result.verification, result.cached, result.zip_path.name),
                usage_snippet(result, codes))

    def export_shown(choice, full_now, model_name, codes, progress=gr.Progress()):  # noqa: B008
        path, verified, usage = export(choice, full_now, model_name, codes, progress)
        return (gr.update(value=path, visible=True), verified,
                gr.update(value=usage, visible=True))

    endpoint([build_button.click], export, [formats, full, ctx.model_state, steer.codes],
             [download, report, snippet], status=report, api_name="export",
             browser=export_shown, concurrency_limit=1, concurrency_id="export",
             show_progress_on=report, preprocess=False)
