"""`python -m distill ...` is `kdgate distill ...`."""

import sys

from distill.cli import main

sys.exit(main())
