"""Tests of the built-in methods and of kdbench.losses; ``methods.kit`` holds their shared helpers."""
