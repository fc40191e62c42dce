"""`python -m charlm` is the `charlm` command."""

from .cli import main

main(prog_name="charlm")
