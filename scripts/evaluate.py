#!/usr/bin/env python
"""Score a base or base + adapter: `python scripts/evaluate.py --model BASE --adapter A` (= `qloraga evaluate`)."""

import sys

from qloraga.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
