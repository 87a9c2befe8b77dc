"""`python -m qloraga COMMAND ...`: the same as the `qloraga` command."""

import sys

from qloraga.cli import main

sys.exit(main())
