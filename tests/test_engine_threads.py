"""The engine's start-up work runs on a thread that exits (threads.py): results, errors and
grad mode come back as if it had run on the caller's thread."""

from __future__ import annotations

import threading

import pytest
import torch

from hatrack.server.engine.errors import EngineError
from hatrack.server.engine.threads import on_passing_thread


def test_the_result_comes_from_another_thread_that_is_gone():
    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        seen["threads"] = torch.get_num_threads()
        seen["grad"] = torch.is_grad_enabled()
        return 41 + 1

    with torch.no_grad():
        assert on_passing_thread(work) == 42
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["threads"] == torch.get_num_threads() and seen["grad"] is False


def test_an_error_is_raised_on_the_callers_thread_with_its_type():
    def fail():
        raise EngineError("the KV cache budget holds no request")

    with pytest.raises(EngineError, match="holds no request"):
        on_passing_thread(fail)
