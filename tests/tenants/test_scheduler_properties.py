"""Properties over random windows, blackouts, timezones and instants, with
instants drawn near DST transitions as often as anywhere else: the scheduler's
answers agree with one another, and with an oracle that applies the rules of its
docstring from scratch (at the end of this file)."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tenants import scheduler as s

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # 30-minute DST
    "America/Santiago",  # changes at midnight
    "Pacific/Chatham",  # +12:45 / +13:45
    "Asia/Kolkata",  # no DST, half-hour offset
    "America/St_Johns",
]
LO, HI = datetime(2026, 1, 1, tzinfo=UTC), datetime(2029, 1, 1, tzinfo=UTC)
PROFILE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def transitions() -> tuple[tuple[str, datetime], ...]:
    """Every UTC-offset change of ZONES between LO and HI, with its zone."""
    found = []
    for key in ZONES:
        zi = s.zone(key)
        t = LO
        while t < HI:
            nxt = t + timedelta(hours=6)
            if t.astimezone(zi).utcoffset() != nxt.astimezone(zi).utcoffset():
                found.append((key, s._transition_between(t, nxt, zi)))
            t = nxt
    return tuple(sorted(found, key=lambda kt: kt[1]))


minutes: st.SearchStrategy[time] = st.integers(0, 24 * 60 - 1).map(lambda m: time(m // 60, m % 60))
quarter_hours: st.SearchStrategy[time] = st.integers(0, 95).map(lambda q: time(q // 4, q % 4 * 15))
times: st.SearchStrategy[time] = st.one_of(quarter_hours, minutes)
windows: st.SearchStrategy[s.Window] = st.builds(
    s.Window,
    days=st.frozensets(st.integers(0, 6), min_size=1),
    start=times,
    end=times,
    tz=st.sampled_from(ZONES),
)
anywhere: st.SearchStrategy[datetime] = st.integers(0, int((HI - LO).total_seconds())).map(
    lambda x: LO + timedelta(seconds=x)
)
near_dst: st.SearchStrategy[datetime] = st.builds(
    lambda t, off: t + timedelta(seconds=off),
    st.sampled_from([t for _, t in transitions()]),
    st.integers(-36 * 3600, 36 * 3600),
)
instants: st.SearchStrategy[datetime] = st.one_of(anywhere, near_dst)


@st.composite
def blackouts(draw: st.DrawFn) -> s.Blackout:
    start = draw(instants)
    length = timedelta(minutes=draw(st.integers(1, 20 * 24 * 60)))
    return s.Blackout("b", start, start + length, draw(st.sampled_from(ZONES)), draw(st.booleans()))


schedules: st.SearchStrategy[s.Schedule] = st.builds(
    s.Schedule,
    windows=st.lists(windows, max_size=3).map(tuple),
    blackouts=st.lists(blackouts(), max_size=2).map(tuple),
)
NORMAL = s.ReleaseInfo("1.0.0")


def allowed(schedule: s.Schedule, at: datetime) -> bool:
    return s.can_update_now(schedule, NORMAL, at).allowed


@PROFILE
@given(schedules, instants)
def test_can_update_now_agrees_with_next_window(schedule: s.Schedule, at: datetime) -> None:
    opening = s.next_window(schedule, at)
    assert allowed(schedule, at) == (opening is not None and opening.is_open(at))


@PROFILE
@given(schedules, instants)
def test_next_window_is_the_first_allowed_instant_and_its_end_the_first_closed_one(
    schedule: s.Schedule, at: datetime
) -> None:
    opening = s.next_window(schedule, at)
    assume(opening is not None)
    assert opening is not None  # assume() does not narrow the type
    if opening.start > at:
        assert allowed(schedule, opening.start)
        assert not allowed(schedule, opening.start - timedelta(seconds=1))
        assert not allowed(schedule, at + (opening.start - at) / 2)
    if opening.end is not None:
        assert allowed(schedule, opening.end - timedelta(seconds=1))
        assert not allowed(schedule, opening.end)


@PROFILE
@given(schedules, blackouts(), st.integers(0, 999_999), st.booleans())
def test_never_allowed_during_a_blackout(
    schedule: s.Schedule, blackout: s.Blackout, millionths: int, critical: bool
) -> None:
    schedule = s.Schedule(schedule.windows, (*schedule.blackouts, blackout))
    # Integer arithmetic: a float fraction can round up onto the (open) end.
    at = blackout.start + (blackout.end - blackout.start) * millionths // 1_000_000
    release = s.ReleaseInfo("1.0.0", s.CRITICAL if critical else s.NORMAL)
    verdict = s.can_update_now(schedule, release, at)
    assert not verdict.allowed
    assert verdict.reason.startswith("blackout 'b' until ")


@PROFILE
@given(windows, instants)
def test_every_occurrence_lasts_its_nominal_length_and_opens_at_or_after_its_start(
    window: s.Window, at: datetime
) -> None:
    zi = s.zone(window.tz)
    for span in s.window_occurrences(window, at, at + timedelta(days=8)):
        assert span.end - span.start == window.duration
        local = span.start.astimezone(zi)
        nominal = datetime.combine(local.date(), window.start)
        wall = local.replace(tzinfo=None)
        # Exactly the start time, or later when that wall time was skipped.
        assert wall == nominal or (
            wall > nominal and s.local_to_utc(nominal, window.tz) == span.start
        )


@PROFILE
@given(windows, instants)
def test_one_occurrence_per_chosen_day_none_vanish_none_double(
    window: s.Window, at: datetime
) -> None:
    zi = s.zone(window.tz)
    first = at.astimezone(zi).date()
    days = [first + timedelta(days=i) for i in range(1, 8)]
    lo = s.local_to_utc(datetime.combine(days[0], time()), window.tz)
    hi = s.local_to_utc(datetime.combine(days[-1] + timedelta(days=1), time()), window.tz)
    starts = [
        span.start
        for span in s.window_occurrences(window, lo - timedelta(days=2), hi + timedelta(days=2))
    ]
    nominal = [
        s.local_to_utc(datetime.combine(d, window.start), window.tz)
        for d in days
        if d.weekday() in window.days
    ]
    assert all(starts.count(n) == 1 for n in nominal)


@st.composite
def schedule_and_instant(draw: st.DrawFn) -> tuple[s.Schedule, datetime]:
    """A schedule with windows and an instant that is often inside one of
    them, so few examples are thrown away (random instants mostly are not)."""
    schedule = draw(schedules.filter(lambda sc: sc.windows))
    at = draw(instants)
    if draw(st.booleans()):
        window = draw(st.sampled_from(list(schedule.windows)))
        spans = list(s.window_occurrences(window, at - timedelta(days=8), at + timedelta(days=8)))
        if spans:
            span = draw(st.sampled_from(spans))
            seconds = int((span.end - span.start).total_seconds())
            at = span.start + timedelta(seconds=draw(st.integers(0, max(0, seconds - 1))))
    return schedule, at


@PROFILE
@given(schedule_and_instant())
def test_allowed_means_inside_a_window_when_there_are_windows(
    schedule_at: tuple[s.Schedule, datetime],
) -> None:
    schedule, at = schedule_at
    assume(allowed(schedule, at))
    assert any(
        span.start <= at < span.end
        for w in schedule.windows
        for span in s.window_occurrences(w, at - timedelta(days=1), at + timedelta(seconds=1))
    )


@st.composite
def windows_starting_at_a_dst_edge(draw: st.DrawFn) -> tuple[s.Window, datetime]:
    """A daily window whose start falls in a skipped or repeated hour, and the
    instant its occurrence that day must open at (DST rule 1)."""
    key, jump = draw(st.sampled_from(transitions()))
    zi = s.zone(key)
    before, after = jump - timedelta(seconds=1), jump
    offset_after, offset_before = (
        after.astimezone(zi).utcoffset(),
        before.astimezone(zi).utcoffset(),
    )
    assert offset_after is not None and offset_before is not None  # aware datetimes
    delta = offset_after - offset_before
    after_wall = after.astimezone(zi).replace(tzinfo=None)
    step = timedelta(minutes=draw(st.integers(0, abs(delta) // timedelta(minutes=1) - 1)))
    if delta > timedelta(0):  # spring forward: [after_wall - delta, after_wall) is skipped
        wall, expected = after_wall - delta + step, jump
    else:  # fall back: [after_wall, after_wall - delta) happens twice; the first counts
        wall, expected = after_wall + step, jump + delta + step
    length = draw(st.integers(1, 24 * 60))
    end = (datetime.combine(wall.date(), wall.time()) + timedelta(minutes=length)).time()
    return s.Window(frozenset(range(7)), wall.time(), end, key), expected


@PROFILE
@given(windows_starting_at_a_dst_edge())
def test_a_start_in_a_skipped_hour_opens_at_the_jump_and_in_a_repeated_hour_at_the_first(
    case: tuple[s.Window, datetime],
) -> None:
    window, expected = case
    spans = list(s.window_occurrences(window, expected - timedelta(hours=1), expected))
    spans += s.window_occurrences(window, expected, expected + timedelta(seconds=1))
    assert any(span.start == expected for span in spans)
    assert all(span.end - span.start == window.duration for span in spans)


# --- an independent oracle --------------------------------------------------
#
# The rules of the module docstring, written again from scratch with zoneinfo alone (no
# helper of the scheduler): an occurrence of a window on local date D opens at the first
# instant whose wall clock reads D + start or later, found by walking the real timeline
# minute by minute (then second by second); it lasts the window's nominal length in
# real time; ranges are half-open; a blackout is its instants, and a yearly one repeats
# each year from the same local date and time through the same first-reading rule.

_MINUTE, _SECOND = timedelta(minutes=1), timedelta(seconds=1)


def _wall(instant: datetime, key: str) -> datetime:
    return instant.astimezone(ZoneInfo(key)).replace(tzinfo=None)


@cache
def _first_reading(naive: datetime, key: str) -> datetime:
    """The first instant at which the wall clock of `key` reads `naive` or later."""
    # Every offset lies within UTC-12..UTC+14: 15 hours earlier the clock read less.
    t = (naive - timedelta(hours=15)).replace(tzinfo=UTC, second=0, microsecond=0)
    assert _wall(t, key) < naive
    while _wall(t, key) < naive:
        t += _MINUTE
    t -= _MINUTE  # the clock read less here; the first reading is within the next minute
    while _wall(t, key) < naive:
        t += _SECOND
    return t


def _length(window: s.Window) -> timedelta:
    start = timedelta(hours=window.start.hour, minutes=window.start.minute)
    end = timedelta(hours=window.end.hour, minutes=window.end.minute)
    return end - start if end > start else end - start + timedelta(days=1)


def _oracle_occurrence(window: s.Window, day: date) -> tuple[datetime, datetime]:
    opens = _first_reading(datetime.combine(day, window.start), window.tz)
    return opens, opens + _length(window)


def _oracle_in_window(window: s.Window, at: datetime) -> bool:
    # An occurrence that covers `at` belongs to a local date near `at`'s: at most a day
    # and a DST change earlier, or (a clock that fell back over midnight) a day later.
    today = _wall(at, window.tz).date()
    return any(
        opens <= at < closes
        for day in (today + timedelta(days=n) for n in range(-2, 2))
        if day.weekday() in window.days
        for opens, closes in [_oracle_occurrence(window, day)]
    )


def _same_date(naive: datetime, year: int) -> datetime:
    if (naive.month, naive.day) == (2, 29) and not calendar.isleap(year):
        return naive.replace(year=year, day=28)
    return naive.replace(year=year)


def _oracle_in_blackout(blackout: s.Blackout, at: datetime) -> bool:
    if blackout.start <= at < blackout.end:
        return True
    if not blackout.yearly:
        return False
    first, last = _wall(blackout.start, blackout.tz), _wall(blackout.end, blackout.tz)
    for year in range(first.year + 1, at.year + 2):
        starts = _first_reading(_same_date(first, year), blackout.tz)
        ends = _first_reading(_same_date(last, year + last.year - first.year), blackout.tz)
        if starts <= at < ends:
            return True
    return False


def oracle_allowed(schedule: s.Schedule, at: datetime) -> bool:
    """May a normal release start at `at` under the default policy, by the definition."""
    in_window = not schedule.windows or any(_oracle_in_window(w, at) for w in schedule.windows)
    return in_window and not any(_oracle_in_blackout(b, at) for b in schedule.blackouts)


def _edges(window: s.Window, day: date) -> list[datetime]:
    """The opening and the close of the window's occurrence on `day`, as the oracle places
    them, and a second either side of each."""
    return [
        edge + timedelta(seconds=n) for edge in _oracle_occurrence(window, day) for n in (-1, 0, 1)
    ]


@st.composite
def window_at_a_dst_change(draw: st.DrawFn) -> tuple[s.Window, list[datetime]]:
    """A window of a zone on the day it changes its clocks, mostly starting in or next to
    the skipped or repeated hour, else up to a day before (spanning the change) or a few
    hours after; and the instants at the edges of that day's occurrence."""
    key, jump = draw(st.sampled_from(transitions()))
    minutes_ = draw(st.one_of(st.integers(-90, 90), st.integers(-26 * 60, 3 * 60)))
    wall = _wall(jump, key) + timedelta(minutes=minutes_)
    start = wall.time().replace(second=0)
    end = (wall + timedelta(minutes=draw(st.integers(1, 24 * 60)))).time().replace(second=0)
    days = draw(st.frozensets(st.integers(0, 6))) | {wall.weekday()}
    window = s.Window(frozenset(days), start, end, key)
    return window, _edges(window, wall.date())


@st.composite
def window_anywhere(draw: st.DrawFn) -> tuple[s.Window, list[datetime]]:
    """Any window, and an instant anywhere or the edges of a nearby occurrence."""
    window, at = draw(windows), draw(instants)
    if draw(st.booleans()):
        return window, [at]
    return window, _edges(window, _wall(at, window.tz).date() + timedelta(draw(st.integers(-1, 1))))


def _blackout_edges(blackout: s.Blackout) -> list[datetime]:
    """A blackout's start and end, and for a yearly one those of its first repeat as the
    oracle places them; each with a second either side."""
    edges = [blackout.start, blackout.end]
    if blackout.yearly:
        first, last = _wall(blackout.start, blackout.tz), _wall(blackout.end, blackout.tz)
        year = first.year + 1
        edges.append(_first_reading(_same_date(first, year), blackout.tz))
        edges.append(_first_reading(_same_date(last, year + last.year - first.year), blackout.tz))
    return [edge + timedelta(seconds=n) for edge in edges for n in (-1, 0, 1)]


@st.composite
def schedule_and_edges(draw: st.DrawFn) -> tuple[s.Schedule, list[datetime]]:
    """A schedule and instants, most often at the edges of a window around a DST change
    (where mistakes hide), with other windows and blackouts around it, and the edges of
    those blackouts."""
    if draw(st.integers(0, 9)) == 0:
        schedule = draw(schedules)  # a windowless schedule among them
        ats = [draw(instants)]
    else:
        window, ats = draw(st.one_of(window_at_a_dst_change(), window_anywhere()))
        others = draw(st.lists(windows, max_size=2))
        blackouts_ = draw(st.lists(blackouts(), max_size=2))
        schedule = s.Schedule(windows=(window, *others), blackouts=tuple(blackouts_))
    return schedule, ats + [at for b in schedule.blackouts for at in _blackout_edges(b)]


@PROFILE
@given(schedule_and_edges())
def test_can_update_now_matches_the_definition(
    schedule_ats: tuple[s.Schedule, list[datetime]],
) -> None:
    schedule, ats = schedule_ats
    for at in ats:
        assert allowed(schedule, at) == oracle_allowed(schedule, at), at


def _walk(schedule: s.Schedule, start: datetime, want: bool, limit: timedelta) -> datetime | None:
    """The first whole minute from `start` at which the oracle says `want`."""
    t = start
    while t < start + limit:
        if oracle_allowed(schedule, t) == want:
            return t
        t += _MINUTE
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(window_at_a_dst_change(), window_anywhere()), st.lists(windows, max_size=2))
def test_next_window_matches_a_minute_by_minute_walk(
    window_ats: tuple[s.Window, list[datetime]], others: list[s.Window]
) -> None:
    """Windows open and close on whole minutes, so a walk over whole minutes finds the
    opening that next_window computes, and its end."""
    window, ats = window_ats
    schedule = s.Schedule(windows=(window, *others))
    at = ats[0].replace(second=0) - _MINUTE  # a minute before an edge: the walk meets it
    opening = s.next_window(schedule, at)
    assert opening is not None  # every window has a day: one opens within a week
    # A week and a day reaches the next occurrence of any window, whatever the clocks do.
    opens = _walk(schedule, at, True, timedelta(days=8))
    assert opens is not None
    if opens == at:
        assert opening.start <= at
    else:
        assert opening.start == opens
    closes = _walk(schedule, opens, False, s.END_HORIZON)
    assert opening.end == closes
