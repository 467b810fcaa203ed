"""Properties over random windows, blackouts, timezones and instants, with
instants drawn near DST transitions as often as anywhere else."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import cache

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
