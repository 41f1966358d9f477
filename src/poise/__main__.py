"""`python -m poise` (also what torchrun launches): the `poise` command."""

import sys

from poise.cli import main

sys.exit(main())
