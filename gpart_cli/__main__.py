"""`python -m gpart_cli` runs the `gpart` command line."""

from .commands.app import main

main()
