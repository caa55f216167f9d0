"""Test-wide fixtures."""

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision, device) and refuses an Accelerator
    with other settings; training tests run in one process, so reset it after each test, as
    accelerate's own test suite does."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
