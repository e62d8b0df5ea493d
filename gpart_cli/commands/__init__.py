"""The `gpart` command line: thin commands that parse, call the library once, and print."""
