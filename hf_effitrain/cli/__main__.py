"""`python -m hf_effitrain.cli COMMAND ...` (what `accelerate launch` / `torchrun -m` use)."""

import sys

from hf_effitrain.cli import console_main

sys.exit(console_main())
