#!/usr/bin/env python
"""Merge a finished run into a bf16 model: `python scripts/export.py --run OUT` (= `qloraga export`; see --help)."""

import sys

from qloraga.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
