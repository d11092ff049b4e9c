"""Codebook Features Studio: ``python app.py`` (also the Hugging Face Space's entry point).

Settings come from the environment; see ``app/settings.py``.
"""

import sys

from app.main import main

if __name__ == "__main__":
    sys.exit(main())
