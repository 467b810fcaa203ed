"""When may a tenant's nodes update? Plain Python: dataclasses in, results out.

No Django import here, so the rules can be tested exhaustively (hypothesis) and
reused by anything that can describe a tenant's schedule.

Vocabulary
----------
* A *window* is a weekly recurring local time range (`days`, `start`, `end`,
  IANA `tz`). An occurrence belongs to the day it starts on: "Fri 22:00-02:00"
  runs from Friday 22:00 to Saturday 02:00. `end <= start` means the range
  crosses midnight; `end == start` is a full 24 hours.
* A *blackout* is an absolute range [start, end) with the timezone it was
  entered in, optionally repeating every year on the same local dates and
  times (an end-of-quarter freeze). 29 February becomes 28 February in
  other years. Blackouts beat windows, and apply with or without windows.
* A tenant with no windows may update at any time outside blackouts.
* Every range is half-open: a window 02:00-04:00 admits 02:00:00, not 04:00:00.

DST semantics (chosen so that a window never vanishes, never doubles and never
changes length)
----------------------------------------------------------------------------
1. An occurrence starts at the first instant at which the local wall clock
   reads the start time or later on that date:
   - a start inside a spring-forward gap (02:00 or 02:30 on the day New York
     jumps from 02:00 to 03:00) opens at the jump itself, 03:00 EDT;
   - an ambiguous start on the fall-back day (01:00 when 01:00-02:00 happens
     twice) opens at the first of the two, 01:00 EDT.
2. An occurrence lasts its nominal length in real elapsed time (end - start on
   the wall clock, plus 24 h when it crosses midnight), whatever the clocks do
   meanwhile. So on the spring-forward day a 02:00-03:00 window runs 03:00-04:00
   EDT (one hour, not zero); on the fall-back day a 01:00-02:00 window runs from
   01:00 EDT to 01:00 EST (one hour, not two), and the repeated hour 01:00-02:00
   EST is outside it. A 22:00-02:00 window spanning a change still lasts 4 h,
   so its wall-clock end moves by the size of the change.
3. Blackouts are stored as absolute instants; a yearly repeat maps each
   year's local start and end through rule 1.

Policy and priorities
---------------------
* critical releases of a tenant with `auto_apply_critical` go out at once:
  no window, no consent, but never during a blackout;
* otherwise a release needs consent when `requires_consent` is on or
  `auto_update` is off (the tenant takes no release nobody approved), and
  then waits for a window;
* a consent counts when granted and not expired; consent is checked before
  the clock so that a node waits for the human first (WAITING_FOR_CONSENT).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CRITICAL, NORMAL, LOW = "critical", "normal", "low"
PRIORITIES = (CRITICAL, NORMAL, LOW)
# How far ahead next_window looks before it says "no window".
MAX_HORIZON = timedelta(days=800)
_CHUNK = timedelta(days=8)
# How far an open stretch is followed to find its end (then: "open, no end in sight").
END_HORIZON = timedelta(days=35)
# Long enough to see an occurrence that started the day before yesterday and
# still runs (24 h plus any DST shift).
_LOOKBACK = timedelta(days=2)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class InvalidSchedule(ValueError):
    """A window or blackout that cannot be evaluated (bad timezone, empty range)."""


@lru_cache(maxsize=512)
def zone(key: str) -> ZoneInfo:
    """The ZoneInfo for an IANA key; InvalidSchedule for anything else."""
    if not key or key != key.strip() or key.startswith(("/", ".")) or ".." in key:
        raise InvalidSchedule(f"unknown timezone {key!r}")
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise InvalidSchedule(f"unknown timezone {key!r}") from None


def priority_rank(priority: str) -> int:
    """Sort key: critical first, unknown priorities count as normal."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else PRIORITIES.index(NORMAL)


# --- inputs ---------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday ... 6 = Sunday
    start: time
    end: time
    tz: str
    label: str = ""

    def __post_init__(self) -> None:
        zone(self.tz)
        if not self.days or not self.days <= set(range(7)):
            raise InvalidSchedule("a window needs at least one day (0 = Monday ... 6 = Sunday)")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise InvalidSchedule("window times are local wall-clock times, without tzinfo")

    @property
    def duration(self) -> timedelta:
        """Nominal length; also the real length of every occurrence (DST rule 2)."""
        minutes = _seconds(self.end) - _seconds(self.start)
        return timedelta(seconds=minutes if minutes > 0 else minutes + 86400)

    @property
    def crosses_midnight(self) -> bool:
        return _seconds(self.end) <= _seconds(self.start)

    def describe(self) -> str:
        return f"{days_label(self.days)} {self.start:%H:%M}-{self.end:%H:%M} {self.tz}"


@dataclass(frozen=True)
class Blackout:
    name: str
    start: datetime  # aware
    end: datetime  # aware
    tz: str = "UTC"
    yearly: bool = False

    def __post_init__(self) -> None:
        zone(self.tz)
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InvalidSchedule("blackout instants must be timezone-aware")
        if self.end <= self.start:
            raise InvalidSchedule("a blackout must end after it starts")
        if self.yearly and self.end - self.start >= timedelta(days=365):
            raise InvalidSchedule("a yearly blackout must be shorter than a year")


@dataclass(frozen=True)
class Policy:
    auto_update: bool = True
    auto_apply_critical: bool = True
    requires_consent: bool = False


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    priority: str = NORMAL


@dataclass(frozen=True)
class ConsentState:
    granted: bool
    decided_by: str = ""
    reason: str = ""
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Schedule:
    """Everything that decides when one tenant's nodes may update."""

    windows: tuple[Window, ...] = ()
    blackouts: tuple[Blackout, ...] = ()  # the tenant's and the fleet-wide ones
    policy: Policy = field(default_factory=Policy)
    tenant_name: str = "the tenant"


# --- outputs --------------------------------------------------------------


class Hold(enum.StrEnum):
    WINDOW = "WAITING_FOR_WINDOW"
    CONSENT = "WAITING_FOR_CONSENT"


@dataclass(frozen=True)
class Opening:
    """A stretch of time in which updates are allowed.

    `start <= after` means it is open at the instant asked about (`start` may
    then be clipped to two days before); `end` is None when the stretch is
    still open END_HORIZON after it opens (open already: after the instant asked
    about)."""

    start: datetime
    end: datetime | None
    tz: str

    @property
    def local_start(self) -> datetime:
        return self.start.astimezone(zone(self.tz))

    def is_open(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    hold: Hold | None
    reason: str
    opening: Opening | None  # the current or next opening (windows and blackouts only)


# --- time arithmetic ------------------------------------------------------


def _seconds(t: time) -> int:
    return t.hour * 3600 + t.minute * 60 + t.second


# What a schedule may name: instants outside these years are refused (no overflow at the
# calendar's edges, in any zone, when a week or a yearly repeat is computed around them).
FIRST_YEAR, LAST_YEAR = 1971, 2199


def check_in_range(naive: datetime, what: str) -> None:
    if not FIRST_YEAR <= naive.year <= LAST_YEAR:
        raise InvalidSchedule(f"{what}: must lie between {FIRST_YEAR} and {LAST_YEAR}")


def local_to_utc(naive: datetime, tz: str) -> datetime:
    """The first instant whose local wall time in `tz` is `naive` or later (DST rule 1)."""
    zi = zone(tz)
    first = naive.replace(tzinfo=zi, fold=0)
    as_utc = first.astimezone(UTC)
    if as_utc.astimezone(zi).replace(tzinfo=None) == naive:
        return as_utc  # exists; for an ambiguous time fold=0 is the first occurrence
    # In a gap: fold=1 reads it with the later offset (an instant before the
    # jump), fold=0 with the earlier one (after the jump). The jump lies between.
    return _transition_between(naive.replace(tzinfo=zi, fold=1).astimezone(UTC), as_utc, zi)


def _transition_between(lo: datetime, hi: datetime, zi: ZoneInfo) -> datetime:
    """The first whole second in (lo, hi] with hi's UTC offset (binary search)."""
    target = hi.astimezone(zi).utcoffset()
    lo_s, hi_s = int(lo.timestamp()), int(hi.timestamp())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zi).utcoffset() == target:
            hi_s = mid
        else:
            lo_s = mid
    return datetime.fromtimestamp(hi_s, UTC)


@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime
    tz: str
    label: str = ""


def window_occurrences(window: Window, lo: datetime, hi: datetime) -> Iterator[Span]:
    """Occurrences of `window` that overlap [lo, hi), in UTC, in order."""
    zi = zone(window.tz)
    day = lo.astimezone(zi).date() - _LOOKBACK
    last = hi.astimezone(zi).date() + timedelta(days=1)
    while day <= last:
        if day.weekday() in window.days:
            start = local_to_utc(datetime.combine(day, window.start), window.tz)
            end = start + window.duration
            if end > lo and start < hi:
                yield Span(start, end, window.tz, window.describe())
        day += timedelta(days=1)


def _same_date_in(year: int, local: datetime) -> datetime:
    try:
        return local.replace(year=year)
    except ValueError:  # 29 February in a common year
        return local.replace(year=year, day=28)


def blackout_occurrences(blackout: Blackout, lo: datetime, hi: datetime) -> Iterator[Span]:
    """Occurrences of `blackout` that overlap [lo, hi), in UTC, in order."""
    if not blackout.yearly:
        if blackout.end > lo and blackout.start < hi:
            yield Span(blackout.start, blackout.end, blackout.tz, blackout.name)
        return
    zi = zone(blackout.tz)
    local_start = blackout.start.astimezone(zi).replace(tzinfo=None)
    local_end = blackout.end.astimezone(zi).replace(tzinfo=None)
    years_long = local_end.year - local_start.year
    # A yearly blackout repeats forwards from its first occurrence only.
    for year in range(max(local_start.year, lo.year - 2), hi.year + 2):
        if year == local_start.year:
            # The first occurrence is the one entered, to the instant: re-reading its wall
            # time would lose which of an ambiguous hour's two readings it was (DST end).
            start, end = blackout.start, blackout.end
        else:
            start = local_to_utc(_same_date_in(year, local_start), blackout.tz)
            end = local_to_utc(_same_date_in(year + years_long, local_end), blackout.tz)
        if end > lo and start < hi and end > start:
            yield Span(start, end, blackout.tz, blackout.name)


def _merge(spans: Iterable[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if merged and span.start <= merged[-1].end:
            if span.end > merged[-1].end:
                merged[-1] = replace(merged[-1], end=span.end)
        else:
            merged.append(span)
    return merged


def _subtract(base: list[Span], holes: list[Span]) -> list[Span]:
    """base minus holes; both merged and sorted."""
    result: list[Span] = []
    for span in base:
        pieces = [span]
        for hole in holes:
            if hole.end <= span.start or hole.start >= span.end:
                continue
            nxt: list[Span] = []
            for piece in pieces:
                if hole.start > piece.start:
                    nxt.append(replace(piece, end=min(piece.end, hole.start)))
                if hole.end < piece.end:
                    nxt.append(replace(piece, start=max(piece.start, hole.end)))
            pieces = [p for p in nxt if p.end > p.start]
        result.extend(pieces)
    return result


def _allowed_spans(
    schedule: Schedule, lo: datetime, hi: datetime, *, use_windows: bool
) -> list[Span]:
    if use_windows and schedule.windows:
        base = _merge(s for w in schedule.windows for s in window_occurrences(w, lo, hi))
    else:
        base = [Span(lo, hi, _display_tz(schedule))]
    blocked = _merge(s for b in schedule.blackouts for s in blackout_occurrences(b, lo, hi))
    return _subtract(base, blocked)


def _display_tz(schedule: Schedule) -> str:
    if schedule.windows:
        return schedule.windows[0].tz
    return schedule.blackouts[0].tz if schedule.blackouts else "UTC"


def _require_aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("instants must be timezone-aware")
    return at.astimezone(UTC)


# --- the API --------------------------------------------------------------


def next_window(schedule: Schedule, after: datetime, *, use_windows: bool = True) -> Opening | None:
    """The opening in effect at `after`, else the next one; None within MAX_HORIZON.

    `use_windows=False` asks about blackouts alone (critical releases)."""
    after = _require_aware(after)
    lo, hi = after - _LOOKBACK, after + _CHUNK
    while lo < after + MAX_HORIZON:
        for span in _allowed_spans(schedule, lo, hi, use_windows=use_windows):
            if span.end > after:
                since = max(span.start, after)
                end = _true_end(schedule, span.end, use_windows, since + END_HORIZON)
                return Opening(span.start, end, span.tz)
        lo, hi = hi, hi + _CHUNK
    return None


def _true_end(
    schedule: Schedule, end: datetime, use_windows: bool, limit: datetime
) -> datetime | None:
    """Follow a stretch past chunk edges and adjacent occurrences to where it
    really closes; None when it does not close before `limit`."""
    while end < limit:
        spans = _allowed_spans(schedule, end, end + _CHUNK, use_windows=use_windows)
        following = next((s for s in spans if s.start <= end < s.end), None)
        if following is None:
            return end
        end = following.end
    return None


def active_blackout(schedule: Schedule, at: datetime) -> Span | None:
    """The blackout occurrence covering `at` that lasts longest, if any."""
    at = _require_aware(at)
    hits = [
        s
        for b in schedule.blackouts
        for s in blackout_occurrences(b, at - timedelta(days=1), at + timedelta(seconds=1))
        if s.start <= at < s.end
    ]
    return max(hits, key=lambda s: s.end) if hits else None


def bypasses_windows(policy: Policy, release: ReleaseInfo) -> bool:
    return release.priority == CRITICAL and policy.auto_apply_critical


def consent_needed(policy: Policy, release: ReleaseInfo) -> bool:
    if bypasses_windows(policy, release):
        return False
    return policy.requires_consent or not policy.auto_update


def can_update_now(
    schedule: Schedule,
    release: ReleaseInfo,
    at: datetime,
    consent: ConsentState | None = None,
) -> Verdict:
    """May a node of this tenant start updating to `release` at `at`?"""
    at = _require_aware(at)
    use_windows = not bypasses_windows(schedule.policy, release)
    opening = next_window(schedule, at, use_windows=use_windows)
    if consent_needed(schedule.policy, release):
        problem = consent_problem(consent, release, at, schedule.tenant_name)
        if problem:
            return Verdict(False, Hold.CONSENT, problem, opening)
    blackout = active_blackout(schedule, at)
    if blackout is not None:
        reason = f"blackout '{blackout.label}' until {format_local(blackout.end, blackout.tz)}"
        return Verdict(False, Hold.WINDOW, reason, opening)
    if opening is not None and opening.is_open(at):
        return Verdict(
            True, None, _allowed_reason(schedule, release, opening, use_windows), opening
        )
    if opening is None:
        return Verdict(False, Hold.WINDOW, "no maintenance window in the next two years", None)
    reason = f"outside maintenance windows; next window {format_opening(opening)}"
    return Verdict(False, Hold.WINDOW, reason, opening)


def _allowed_reason(
    schedule: Schedule, release: ReleaseInfo, opening: Opening, use_windows: bool
) -> str:
    if not use_windows:
        return f"critical release {release.version}: applied without waiting for a window"
    if not schedule.windows:
        return "no maintenance windows: any time outside blackouts"
    until = f" until {format_local(opening.end, opening.tz)}" if opening.end else ""
    return f"inside a maintenance window{until}"


def consent_problem(
    consent: ConsentState | None, release: ReleaseInfo, at: datetime, tenant_name: str
) -> str:
    """Why the consent on record does not allow the update; '' when it does."""
    if consent is None:
        return f"waiting for consent from {tenant_name}'s admins for {release.version}"
    if not consent.granted:
        why = f": {consent.reason}" if consent.reason else ""
        return f"consent for {release.version} declined by {consent.decided_by or 'an admin'}{why}"
    if consent.expires_at is not None and consent.expires_at <= at:
        return (
            f"consent for {release.version} expired {format_local(consent.expires_at, 'UTC')};"
            " waiting for a new one"
        )
    return ""


# --- labels ---------------------------------------------------------------


def days_label(days: Iterable[int]) -> str:
    chosen = sorted(set(days))
    if len(chosen) == 7:
        return "daily"
    if chosen == list(range(5)):
        return "Mon-Fri"
    return ",".join(WEEKDAYS[d].capitalize() for d in chosen)


def format_local(instant: datetime, tz: str) -> str:
    """'2027-01-03 00:00 Europe/London' (with the abbreviation when the hour repeats)."""
    local = instant.astimezone(zone(tz))
    return f"{local:%Y-%m-%d %H:%M}{_fold_hint(local)} {tz}"


def format_opening(opening: Opening, now: datetime | None = None) -> str:
    """'Sat 02:00 America/New_York', with '(in 3 h 12 m)' when `now` is given."""
    local = opening.local_start
    when = f"{local:%a %H:%M}" if now is None or opening.start - now < timedelta(days=6) else ""
    when = when or f"{local:%a %Y-%m-%d %H:%M}"
    text = f"{when}{_fold_hint(local)} {opening.tz}"
    if now is None:
        return text
    if opening.start <= now:
        until = f" until {format_local(opening.end, opening.tz)}" if opening.end else ""
        return f"open now{until}"
    return f"{text} (in {format_duration(opening.start - now)})"


def format_duration(delta: timedelta) -> str:
    """'3 h 12 m', '2 d 4 h', 'less than a minute'; rounded down."""
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "less than a minute"
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {mins} m" if hours else f"{mins} m"


def _fold_hint(local: datetime) -> str:
    """' EDT' when this wall time happens twice that day, so it is not ambiguous."""
    other = local.replace(fold=1 - local.fold)
    return f" {local.tzname()}" if other.utcoffset() != local.utcoffset() else ""


# --- validation helpers used by the services ------------------------------


def windows_overlap(a: Window, b: Window) -> bool:
    """Do two windows share any time? Nominal weekly ranges when both use the
    same timezone; otherwise real occurrences over the next two weeks of
    `_reference` (a window pair that never meets in a fortnight never meets)."""
    if a.tz == b.tz:
        return any(_ranges_overlap(x, y) for x in _weekly_ranges(a) for y in _weekly_ranges(b))
    lo = _reference()
    hi = lo + timedelta(days=15)
    spans_b = list(_merge(window_occurrences(b, lo, hi)))
    return any(
        sa.start < sb.end and sb.start < sa.end
        for sa in window_occurrences(a, lo, hi)
        for sb in spans_b
    )


def _reference() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


_WEEK = 7 * 86400


def _weekly_ranges(w: Window) -> Iterator[tuple[int, int]]:
    """Minute-of-week ranges, split at the end of the week."""
    for day in w.days:
        start = day * 86400 + _seconds(w.start)
        end = start + int(w.duration.total_seconds())
        if end <= _WEEK:
            yield start, end
        else:
            yield start, _WEEK
            yield 0, end - _WEEK


def _ranges_overlap(x: tuple[int, int], y: tuple[int, int]) -> bool:
    return x[0] < y[1] and y[0] < x[1]


def week_spans(schedule: Schedule, week_start: datetime) -> tuple[list[Span], list[Span]]:
    """Window and blackout occurrences in the week from `week_start`, for calendars."""
    lo = _require_aware(week_start)
    hi = lo + timedelta(days=7)
    windows = sorted(
        (s for w in schedule.windows for s in window_occurrences(w, lo, hi)),
        key=lambda s: s.start,
    )
    blackouts = sorted(
        (s for b in schedule.blackouts for s in blackout_occurrences(b, lo, hi)),
        key=lambda s: s.start,
    )
    return windows, blackouts
