"""``python -m dynamax_jax "PROMPT"``: generate text with early exits and print the compute
used (the command line is ``dynamax_jax.cli.generate``; ``--help`` lists the flags)."""

import sys

from dynamax_jax.cli import run_cli
from dynamax_jax.cli.generate import PROG, main

if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
