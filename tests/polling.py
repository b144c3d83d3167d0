"""The one way tests wait: poll a condition until it holds, instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str | Callable[[], str] = "") -> T:
    """Call `condition` every `interval` seconds until it returns something truthy, and return that.

    Raises TimeoutError after `timeout` seconds, with `message` (or what it returns) in the text.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"not within {timeout:g} s" + (f": {text}" if text else ""))
        time.sleep(interval)
