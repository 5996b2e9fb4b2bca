"""``python -m segx_helpers audit|train ...`` (the ``segx`` console script); see :mod:`segx_helpers.cli`."""
import sys

from .cli import main

sys.exit(main())
