"""`python -m kdbench` is the `kdbench` command."""
from .cli import main

main()
