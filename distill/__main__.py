"""`python -m kdgate.distill ...` is `kdgate distill ...`."""

import sys

from kdgate.distill.cli import main

sys.exit(main())
