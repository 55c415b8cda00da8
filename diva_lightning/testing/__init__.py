"""Test suites for code built on diva-lightning (needs pytest, the ``dev`` extra).

``AdapterConformance``: the backbone adapter contract; subclass it in a test file.
"""

import pytest

pytest.register_assert_rewrite("diva_lightning.testing.conformance")

from diva_lightning.testing.conformance import AdapterConformance  # noqa: E402

__all__ = ["AdapterConformance"]
