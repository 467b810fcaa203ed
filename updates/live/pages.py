"""How a page's live part refreshes, for the views that render one."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class LivePart:
    """A live part is told of changes by its page's event stream (`stream_url`), with a slow
    poll beside it (`slow_seconds`: what no announcement covers, such as a node's host
    metrics, and an announcement lost); while the stream is not open, or without one, it is
    polled every `fast_ms`. Not live at all (`active` false): it stays as it is.

    Its templates give it `hx-sync="this:replace"`: a change announced while the part's
    previous fetch is in flight fetches again at once. With htmx's default the second
    fetch waits in the element's queue, and the swap that answers the first replaces the
    element and drops what was queued on it: that change would show only at the next slow
    poll."""

    active: bool
    stream_url: str
    fast_ms: int
    slow_seconds: int

    @property
    def trigger(self) -> str:
        """The part's `hx-trigger`: `themis:poll` is what app.js fires while the stream is
        down."""
        if not self.stream_url:
            return f"every {self.fast_ms}ms"
        return f"sse:changed, themis:poll, every {self.slow_seconds}s"


def live_part(*, active: bool, stream_url: str, fast_ms: int, slow_seconds: int) -> LivePart:
    """A page's live part; without a stream when live updates are off."""
    stream = stream_url if active and settings.THEMIS_LIVE_UPDATES else ""
    return LivePart(active, stream, fast_ms, slow_seconds)
