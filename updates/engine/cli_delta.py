"""`themis-update` commands of this group (not implemented yet: usage, exit 2)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    _ = (sub, argparse)
