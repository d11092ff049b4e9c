"""Skip work that importing Gradio and transformers does for developers and notebooks, not for a
served app.

Called by :func:`app.main.main` before anything heavy is imported; it changes nothing the app
serves, only how long ``python app.py`` takes to start (``benchmarks/bench_app.py`` measures it):

* **Gradio's type stubs.** Every time a Gradio component class is defined (about 80 at
  ``import gradio``), Gradio's ``ComponentMeta`` re-parses the component's source file and
  rewrites its ``.pyi`` stub if the stub differs: an aid for editors working on Gradio itself,
  which costs about 2 s of CPU on a 2-core machine, nearly half of Gradio's import time. The stubs
  in an installed Gradio are already written, so the app replaces that function with a no-op as
  ``gradio.component_meta`` is loaded, before any component class exists.
* **Optional packages the app does not use.** Libraries import some packages merely because they
  are installed: Gradio imports IPython to register a notebook cell magic (about 0.5 s), and
  transformers imports scipy for an object-detection loss (about 1 s). Neither is in
  ``requirements.txt``, so a Space does not have them; on a machine that happens to, the app marks
  them as not importable, so these libraries take the path they take on a Space (they check, and
  fall back). Inside an IPython session, or once either is imported, nothing is blocked.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_COMPONENT_META = "gradio.component_meta"
# Installed here but not dependencies of the app (see the module docstring).
_UNUSED_OPTIONAL_PACKAGES = ("IPython", "scipy")


def _no_stub_update(*args, **kwargs) -> None:
    """Stands in for ``gradio.component_meta.create_or_modify_pyi``."""


class _SkipStubUpdates(importlib.abc.MetaPathFinder):
    """Finds ``gradio.component_meta`` as usual, then patches the module right after it runs."""

    def find_spec(self, name, path, target=None):
        if name != _COMPONENT_META:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            # Only if the hook is still the function this patch knows about (a future Gradio may
            # rename or drop it; then its import simply runs as it does).
            if callable(getattr(module, "create_or_modify_pyi", None)):
                module.create_or_modify_pyi = _no_stub_update

        spec.loader.exec_module = exec_module
        return spec


def skip_unused_imports() -> None:
    """Install both skips (see the module docstring). Call it before Gradio or transformers is
    imported; for what is already imported it changes nothing."""
    if "IPython" in sys.modules:  # an IPython session: leave its libraries as they are
        return
    for name in _UNUSED_OPTIONAL_PACKAGES:
        # None in sys.modules: "import NAME" raises ImportError and importlib.util.find_spec
        # returns None, which is how libraries check that an optional package is installed.
        sys.modules.setdefault(name, None)
    if _COMPONENT_META not in sys.modules and not any(
        isinstance(finder, _SkipStubUpdates) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _SkipStubUpdates())
