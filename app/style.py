"""How the app looks: a light theme and a little CSS (passed to ``launch``, as Gradio 6 wants)."""

from __future__ import annotations

import gradio as gr

THEME = gr.themes.Soft(primary_hue="amber", secondary_hue="sky", neutral_hue="slate",
                       radius_size="md")

CSS = """
#intro p { margin: 0.2em 0; }
#intro h1 { margin-bottom: 0.2em; }
.presets { gap: 6px !important; flex-wrap: wrap !important; }
.presets button { flex: 0 0 auto !important; min-width: 0 !important; padding: 4px 14px !important;
  border-radius: 999px !important; }
.story .html-container { padding: 0 !important; }
.story-text { min-height: 9em; padding: 12px 14px; border-radius: 8px; white-space: pre-wrap;
  line-height: 1.65; font-size: 1.03em; background: var(--block-background-fill);
  border: 1px solid var(--block-border-color); }
.story-text .prompt { color: var(--body-text-color-subdued); font-style: italic; }
.story-text.empty { color: var(--body-text-color-subdued); }
.story-text mark, .hint mark { background: #fcd34d; color: #1f2937; padding: 0 2px;
  border-radius: 3px; }
.contexts { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9em; }
.contexts li { margin: 0.25em 0; white-space: pre-wrap; }
.contexts mark { background: #fcd34d; color: #1f2937; padding: 0 2px; border-radius: 3px;
  font-weight: 600; }
.hint { color: var(--body-text-color-subdued); font-size: 0.92em; }
/* A topic switches on dozens of codes: their chips scroll rather than pushing the rest of the
   tab a screen down. Compact chips and room for whole rows: a topic's 24 labelled codes show at
   once on a desktop (the box showed 7, its third row cut); up to MAX_CODES scroll. */
#steering-codes .token, #blocked-codes .token { padding: 2px 6px !important;
  font-size: 0.85em; }
#steering-codes .wrap-inner, #blocked-codes .wrap-inner { max-height: 32em; overflow-y: auto; }
/* Generate, Stop and Clear steering keep their words on one line (on a phone "Clear steering"
   wrapped to two beside a one-line Generate). */
.actions button { white-space: nowrap; }
@media (max-width: 640px) {
  #intro h1 { font-size: 1.4em; }
  /* Five tabs at Gradio's padding are wider than a phone, and Gradio's overflow menu did not
     step in: the whole page scrolled sideways. */
  .tab-container button { padding: 0 6px !important; }
}
"""
