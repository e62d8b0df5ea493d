"""`python -m gpart_cli` runs the `gpart` command line."""

from .cli.app import main

main()
