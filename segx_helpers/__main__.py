"""``python -m segx_helpers audit|train ...`` (the ``segx`` console script); see :mod:`segx_helpers.cli.main`."""
import sys

from segx_helpers.cli.main import main

sys.exit(main())
