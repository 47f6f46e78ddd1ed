"""Shared by the tests of kdbench.testing (the conformance kit)."""
import re

import pytest


@pytest.fixture
def fails():
    """``fails(pattern, check, *args, **kw)``: the check raises an AssertionError whose message
    matches ``pattern``; returns the message."""

    def check_fails(pattern, fn, *args, **kw):
        with pytest.raises(AssertionError) as info:
            fn(*args, **kw)
        assert re.search(pattern, str(info.value)), str(info.value)
        return str(info.value)

    return check_fails
