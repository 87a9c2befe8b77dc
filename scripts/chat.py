#!/usr/bin/env python
"""Chat with a fine-tuned run: `python scripts/chat.py --run OUT [--prompt "..."]` (see --help)."""

import sys

from qloraga.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
