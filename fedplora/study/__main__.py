"""``python -m fedplora.study FILE.toml``: the same command as ``fedplora study``."""

import sys

from .cli import main

sys.exit(main())
