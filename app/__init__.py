"""The Codebook Features Studio: a Gradio app (and Hugging Face Space) to steer and read a codebook
model. ``python app.py`` serves it; :func:`app.main.main` is the entry point.

Layout, one idea per module:

* :mod:`app.settings`: what the environment configures (model, limits, local-model roots);
* :mod:`app.models`: which model names a visitor may load, and the loaded models;
* :mod:`app.inputs`: checking what visitors type, with messages that name the problem;
* :mod:`app.generation`: unsteered and steered continuations, stepped side by side;
* :mod:`app.highlight`: topic words marked in generated text;
* :mod:`app.analysis`: code search, topic search and code summaries over a model's index;
* :mod:`app.token_view`: the codes chosen at each token of a text;
* :mod:`app.exporting`: ONNX / TorchScript bundles, built once per model and format, zipped;
* :mod:`app.model_info`: the model card, metrics and plots;
* :mod:`app.gpu`: the ZeroGPU decorator (a no-op off Spaces);
* :mod:`app.ui` and :mod:`app.tabs`: the Gradio interface; :mod:`app.main`: launching it;
* :mod:`app.lean_imports`: skipping import-time work the app does not need (start-up time).
"""
