#!/usr/bin/env python
"""Fine-tune with LoRA-GA on a 4-bit base: `python scripts/finetune.py --4bit` (see --help)."""

import sys

from qloraga.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
