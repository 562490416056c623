"""`python -m adaptor.cli ...`: the same as the `matryoshka-adaptor` console script."""

import sys

from adaptor.cli import main

sys.exit(main())
