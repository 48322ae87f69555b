"""`python -m tokenmill.cli`: the same as the `tokenmill` command."""

from tokenmill.cli import main

main()
