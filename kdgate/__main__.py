"""`python -m kdgate ...` is the `kdgate` command."""

import sys

from kdgate.service.cli import main

sys.exit(main())
