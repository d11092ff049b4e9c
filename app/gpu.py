"""``gpu``: ZeroGPU's ``spaces.GPU`` on Hugging Face Spaces, a no-op decorator elsewhere.

On a ZeroGPU Space a GPU is attached only while a function decorated with ``spaces.GPU`` runs;
the ``spaces`` package exists only there (it is not installable elsewhere), so its absence means
"no ZeroGPU" and the functions run as they are.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import spaces
except ImportError:
    spaces = None


def gpu(duration: int = 60) -> Callable[[Callable], Callable]:
    """Decorator asking ZeroGPU for a GPU for up to ``duration`` seconds per call."""

    def decorate(fn: Callable) -> Callable:
        if spaces is None:
            return fn
        return spaces.GPU(duration=duration)(fn)

    return decorate

