"""Scheduler rules at their exact edges: consent expiry, priorities, the wording a tenant
admin reads, and the checks on what a schedule may hold."""

from __future__ import annotations

import time as clock
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta

import pytest

from tenants import scheduler as s
from tenants.scheduler import ConsentState, Hold, Policy, ReleaseInfo, Schedule, Window

NORMAL = ReleaseInfo("1.7.0")
AT = datetime(2027, 1, 5, 12, 0, tzinfo=UTC)


def test_consent_is_valid_until_the_instant_it_expires() -> None:
    schedule = Schedule(policy=Policy(requires_consent=True))
    second_left = ConsentState(True, "alice", "", AT + timedelta(seconds=1))
    assert s.can_update_now(schedule, NORMAL, AT, second_left).allowed
    expired = s.can_update_now(schedule, NORMAL, AT, ConsentState(True, "alice", "", AT))
    assert expired.hold is Hold.CONSENT
    assert expired.reason == (
        "consent for 1.7.0 expired 2027-01-05 12:00 UTC; waiting for a new one"
    )
    forever = ConsentState(True, "alice")
    assert s.consent_problem(forever, NORMAL, AT, "Tenant A") == ""


def test_a_declined_consent_names_who_declined_and_why_when_known() -> None:
    assert (
        s.consent_problem(ConsentState(False), NORMAL, AT, "Tenant A")
        == "consent for 1.7.0 declined by an admin"
    )
    assert (
        s.consent_problem(ConsentState(False, "bob", "peak"), NORMAL, AT, "Tenant A")
        == "consent for 1.7.0 declined by bob: peak"
    )


def test_priorities_rank_critical_first_and_unknown_as_normal() -> None:
    ranks = {p: s.priority_rank(p) for p in (s.CRITICAL, s.NORMAL, s.LOW, "urgent", "")}
    assert ranks == {s.CRITICAL: 0, s.NORMAL: 1, s.LOW: 2, "urgent": 1, "": 1}


@pytest.mark.parametrize(
    ("days", "label"),
    [
        (range(7), "daily"),
        (range(5), "Mon-Fri"),
        ([5, 6], "Sat,Sun"),
        ([4, 0, 0], "Mon,Fri"),
        (range(6), "Mon,Tue,Wed,Thu,Fri,Sat"),
    ],
)
def test_days_label(days: list[int], label: str) -> None:
    assert s.days_label(days) == label


def test_a_window_describes_itself() -> None:
    window = Window(frozenset({0, 1, 2, 3, 4}), time(22), time(2, 30), "Europe/Berlin")
    assert window.describe() == "Mon-Fri 22:00-02:30 Europe/Berlin"
    assert window.crosses_midnight is True
    assert window.duration == timedelta(hours=4, minutes=30)


@pytest.mark.parametrize(("year", "ok"), [(1970, False), (1971, True), (2199, True), (2200, False)])
def test_instants_are_accepted_between_1971_and_2199(year: int, ok: bool) -> None:
    naive = datetime(year, 6, 1, 12, 0)
    if ok:
        s.check_in_range(naive, "the date")
        return
    with pytest.raises(s.InvalidSchedule) as refused:
        s.check_in_range(naive, "the date")
    assert str(refused.value) == "the date: must lie between 1971 and 2199"


def test_week_spans_are_the_weeks_windows_and_blackouts_in_order() -> None:
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    schedule = Schedule(
        windows=(
            Window(frozenset({2}), time(22), time(2), "UTC", "late"),
            Window(frozenset({0, 6}), time(1), time(3), "UTC", "early"),
        ),
        blackouts=(
            s.Blackout(
                "freeze", datetime(2027, 1, 8, tzinfo=UTC), datetime(2027, 1, 9, tzinfo=UTC)
            ),
            s.Blackout("audit", datetime(2027, 1, 5, tzinfo=UTC), datetime(2027, 1, 6, tzinfo=UTC)),
            s.Blackout(
                "later", datetime(2027, 1, 20, tzinfo=UTC), datetime(2027, 1, 21, tzinfo=UTC)
            ),
        ),
    )
    windows, blackouts = s.week_spans(schedule, monday)
    # Sunday 3 January's 01:00-03:00 ended before the week began; the next Sunday's is in it.
    assert [(w.start, w.end, w.label) for w in windows] == [
        (monday.replace(hour=1), monday.replace(hour=3), "Mon,Sun 01:00-03:00 UTC"),
        (
            monday.replace(day=6, hour=22),
            monday.replace(day=7, hour=2),
            "Wed 22:00-02:00 UTC",
        ),
        (monday.replace(day=10, hour=1), monday.replace(day=10, hour=3), "Mon,Sun 01:00-03:00 UTC"),
    ]
    assert [b.label for b in blackouts] == ["audit", "freeze"]


def test_week_spans_need_an_aware_start() -> None:
    with pytest.raises(ValueError, match=r"^instants must be timezone-aware$"):
        s.week_spans(Schedule(), datetime(2027, 1, 4))


def test_week_spans_leave_out_blackouts_that_only_touch_the_week() -> None:
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    next_monday = monday + timedelta(days=7)
    schedule = Schedule(
        blackouts=(
            s.Blackout("before", monday - timedelta(hours=2), monday),
            s.Blackout("after", next_monday, next_monday + timedelta(hours=2)),
            s.Blackout("inside", monday, monday + timedelta(hours=1)),
        )
    )
    _, blackouts = s.week_spans(schedule, monday)
    assert [b.label for b in blackouts] == ["inside"]


def test_a_minute_is_no_longer_less_than_a_minute() -> None:
    assert s.format_duration(timedelta(seconds=59)) == "less than a minute"
    assert s.format_duration(timedelta(minutes=1)) == "1 m"
    assert s.format_duration(timedelta(minutes=1, seconds=59)) == "1 m"


def _weekly(days: set[int], start: time, end: time, tz: str = "UTC") -> Window:
    return Window(frozenset(days), start, end, tz)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        # Sunday night runs into Monday 01:00: it touches a Monday 01:00 window, no more ...
        (_weekly({6}, time(23), time(1)), _weekly({0}, time(1), time(2)), False),
        # ... covers Monday's first second ...
        (_weekly({6}, time(23), time(1)), _weekly({0}, time(0), time(0, 0, 1)), True),
        # ... and nothing later in the week.
        (_weekly({6}, time(23), time(1)), _weekly({2}, time(10), time(11)), False),
        # Zones without DST, so the answer does not depend on today's date: 01:00-02:00 UTC
        # and 11:00-12:00 Tokyo (02:00-03:00 UTC) touch; 10:30-11:30 Tokyo overlaps.
        (
            _weekly(set(range(7)), time(1), time(2)),
            _weekly(set(range(7)), time(11), time(12), "Asia/Tokyo"),
            False,
        ),
        (
            _weekly(set(range(7)), time(1), time(2)),
            _weekly(set(range(7)), time(10, 30), time(11, 30), "Asia/Tokyo"),
            True,
        ),
    ],
)
def test_windows_overlap_at_the_week_end_and_across_zones(
    a: Window, b: Window, overlap: bool
) -> None:
    assert s.windows_overlap(a, b) is overlap
    assert s.windows_overlap(b, a) is overlap


def test_blackouts_need_two_aware_instants_and_a_positive_length() -> None:
    aware = datetime(2027, 1, 1, tzinfo=UTC)
    naive = datetime(2027, 1, 2)
    for start, end in ((naive, aware), (aware, naive)):
        with pytest.raises(s.InvalidSchedule) as refused:
            s.Blackout("x", start, end)
        assert str(refused.value) == "blackout instants must be timezone-aware"
    with pytest.raises(s.InvalidSchedule) as refused:
        s.Blackout("x", aware, aware)
    assert str(refused.value) == "a blackout must end after it starts"
    with pytest.raises(s.InvalidSchedule) as refused:
        s.Blackout("x", aware, aware + timedelta(days=365), yearly=True)
    assert str(refused.value) == "a yearly blackout must be shorter than a year"
    s.Blackout("x", aware, aware + timedelta(days=364), yearly=True)


def test_week_spans_leave_out_yearly_blackouts_that_only_touch_the_week() -> None:
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    next_monday = monday + timedelta(days=7)
    schedule = Schedule(
        blackouts=(
            s.Blackout(
                "before", datetime(2026, 1, 3, tzinfo=UTC), monday.replace(2026), yearly=True
            ),
            s.Blackout(
                "after",
                next_monday.replace(2026),
                datetime(2026, 1, 12, tzinfo=UTC),
                yearly=True,
            ),
        )
    )
    assert s.week_spans(schedule, monday)[1] == []


def test_a_yearly_blackout_inside_the_hour_clocks_skip_that_year_is_gone_that_year() -> None:
    ny = "America/New_York"
    # 02:10-02:40 on 12 March 2027 (EST); on 12 March 2028 New York jumps from 02:00 to
    # 03:00, so both ends map to 03:00 (DST rule 1) and that year's occurrence is empty.
    blackout = s.Blackout(
        "night work",
        datetime(2027, 3, 12, 7, 10, tzinfo=UTC),
        datetime(2027, 3, 12, 7, 40, tzinfo=UTC),
        tz=ny,
        yearly=True,
    )
    schedule = Schedule(blackouts=(blackout,))
    assert s.week_spans(schedule, datetime(2028, 3, 6, tzinfo=UTC))[1] == []
    assert [
        (b.start, b.end) for b in s.week_spans(schedule, datetime(2029, 3, 12, tzinfo=UTC))[1]
    ] == [(datetime(2029, 3, 12, 6, 10, tzinfo=UTC), datetime(2029, 3, 12, 6, 40, tzinfo=UTC))]


def test_week_spans_leave_out_windows_that_only_touch_the_week() -> None:
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    schedule = Schedule(
        windows=(
            # Sunday 22:00 to midnight: ends as the week begins; next Monday's starts as it ends.
            Window(frozenset({6}), time(22), time(0), "UTC"),
            Window(frozenset({0}), time(0), time(1), "UTC"),
        )
    )
    windows, _ = s.week_spans(schedule, monday)
    assert [(w.start, w.end) for w in windows] == [
        (monday, monday.replace(hour=1)),
        (monday.replace(day=10, hour=22), monday.replace(day=11)),
    ]


def test_a_yearly_blackout_repeats_from_the_first_reading_of_a_repeated_hour() -> None:
    ny = "America/New_York"
    # Entered at the second 01:30 of 7 November 2027 (EST, after the clocks went back);
    # 7 November 2032 repeats that hour too, and a wall time repeats from its first reading
    # (DST rule 1): 01:30 EDT.
    blackout = s.Blackout(
        "b",
        datetime(2027, 11, 7, 6, 30, tzinfo=UTC),
        datetime(2027, 11, 7, 7, 30, tzinfo=UTC),
        tz=ny,
        yearly=True,
    )
    spans = list(
        s.blackout_occurrences(
            blackout, datetime(2032, 11, 1, tzinfo=UTC), datetime(2032, 11, 10, tzinfo=UTC)
        )
    )
    assert [(b.start, b.end) for b in spans] == [
        (datetime(2032, 11, 7, 5, 30, tzinfo=UTC), datetime(2032, 11, 7, 7, 30, tzinfo=UTC))
    ]


def test_a_blackout_is_reported_in_its_own_timezone() -> None:
    freeze = s.Blackout(
        "freeze",
        datetime(2027, 1, 5, tzinfo=UTC),
        datetime(2027, 1, 6, tzinfo=UTC),
        tz="America/New_York",
    )
    verdict = s.can_update_now(Schedule(blackouts=(freeze,)), NORMAL, AT)
    assert verdict.reason == "blackout 'freeze' until 2027-01-05 19:00 America/New_York"


@pytest.fixture
def host_far_west(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's own clock twelve hours behind UTC: the scheduler must never read it."""
    monkeypatch.setenv("TZ", "Etc/GMT+12")
    clock.tzset()
    yield
    monkeypatch.undo()
    clock.tzset()


@pytest.mark.usefixtures("host_far_west")
def test_occurrences_do_not_depend_on_the_hosts_timezone() -> None:
    # Kiritimati is UTC+14: at 11:00 UTC on 5 January it is already 01:00 on the 6th there,
    # while the host reads 23:00 on the 4th. The window that opened at 00:30 local counts.
    window = Window(frozenset(range(7)), time(0, 30), time(1, 30), "Pacific/Kiritimati")
    hi = datetime(2027, 1, 5, 11, 0, tzinfo=UTC)
    spans = list(s.window_occurrences(window, hi - timedelta(hours=1), hi))
    assert [(w.start, w.end) for w in spans] == [
        (datetime(2027, 1, 5, 10, 30, tzinfo=UTC), datetime(2027, 1, 5, 11, 30, tzinfo=UTC))
    ]


def test_a_window_needs_days_of_the_week_and_plain_wall_times() -> None:
    for days in (frozenset(), frozenset({7}), frozenset({0, 7})):
        with pytest.raises(s.InvalidSchedule) as refused:
            Window(days, time(1), time(2), "UTC")
        assert str(refused.value) == "a window needs at least one day (0 = Monday ... 6 = Sunday)"
    aware = time(1, tzinfo=UTC)
    for start, end in ((aware, time(2)), (time(1), time(2, tzinfo=UTC))):
        with pytest.raises(s.InvalidSchedule) as refused:
            Window(frozenset({0}), start, end, "UTC")
        assert str(refused.value) == "window times are local wall-clock times, without tzinfo"


def test_window_lengths_count_seconds() -> None:
    window = Window(frozenset({0}), time(1, 0, 0), time(1, 0, 30), "UTC")
    assert window.duration == timedelta(seconds=30)
    assert window.crosses_midnight is False


NY = "America/New_York"


@pytest.mark.parametrize(
    ("schedule", "release", "reason"),
    [
        (Schedule(), NORMAL, "no maintenance windows: any time outside blackouts"),
        (
            Schedule(windows=(Window(frozenset(range(7)), time(2), time(3), NY),)),
            ReleaseInfo("1.7.1", s.CRITICAL),
            "critical release 1.7.1: applied without waiting for a window",
        ),
        (
            # 07:30 UTC is 02:30 in New York: inside, until 03:00 there.
            Schedule(windows=(Window(frozenset(range(7)), time(2), time(3), NY),)),
            NORMAL,
            "inside a maintenance window until 2027-01-05 03:00 America/New_York",
        ),
        (
            # A whole day, every day: the window never closes.
            Schedule(windows=(Window(frozenset(range(7)), time(0), time(0), NY),)),
            NORMAL,
            "inside a maintenance window",
        ),
    ],
    ids=["no windows", "critical", "inside", "never closes"],
)
def test_an_allowed_update_says_why(schedule: Schedule, release: ReleaseInfo, reason: str) -> None:
    verdict = s.can_update_now(schedule, release, datetime(2027, 1, 5, 7, 30, tzinfo=UTC))
    assert verdict.allowed is True
    assert verdict.reason == reason


def test_an_opening_without_windows_is_shown_in_the_first_blackouts_zone() -> None:
    freeze = s.Blackout(
        "freeze", datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 2, 2, tzinfo=UTC), tz=NY
    )
    opening = s.next_window(Schedule(blackouts=(freeze,)), AT)
    assert opening is not None and opening.tz == NY
    opening = s.next_window(Schedule(), AT)
    assert opening is not None and opening.tz == "UTC"


@pytest.mark.usefixtures("host_far_west")
def test_local_to_utc_answers_in_utc_whatever_the_host() -> None:
    instant = s.local_to_utc(datetime(2027, 1, 5, 2, 0), NY)
    assert instant == datetime(2027, 1, 5, 7, 0, tzinfo=UTC)
    assert instant.utcoffset() == timedelta(0)


def test_an_opening_is_open_from_its_start_until_just_before_its_end() -> None:
    opening = s.Opening(AT, AT + timedelta(hours=1), "UTC")
    assert opening.is_open(AT) is True
    assert opening.is_open(AT + timedelta(minutes=59, seconds=59)) is True
    assert opening.is_open(AT + timedelta(hours=1)) is False
    assert opening.is_open(AT - timedelta(seconds=1)) is False
    assert s.Opening(AT, None, "UTC").is_open(AT + timedelta(days=400)) is True


def test_a_consent_hold_is_not_allowed_and_still_shows_the_next_opening() -> None:
    schedule = Schedule(
        windows=(Window(frozenset(range(7)), time(2), time(3), NY),),
        policy=Policy(requires_consent=True),
    )
    verdict = s.can_update_now(schedule, NORMAL, AT)
    assert verdict.allowed is False
    assert verdict.hold is Hold.CONSENT
    assert verdict.opening == s.next_window(schedule, AT)
    assert verdict.opening is not None


def test_an_allowed_verdict_carries_the_opening_it_is_in() -> None:
    schedule = Schedule(windows=(Window(frozenset(range(7)), time(2), time(3), NY),))
    at = datetime(2027, 1, 5, 7, 30, tzinfo=UTC)
    verdict = s.can_update_now(schedule, NORMAL, at)
    assert verdict.allowed is True
    assert verdict.opening == s.Opening(
        datetime(2027, 1, 5, 7, 0, tzinfo=UTC), datetime(2027, 1, 5, 8, 0, tzinfo=UTC), NY
    )


@pytest.mark.parametrize(
    ("ahead", "text"),
    [
        # Less than six days ahead: the weekday says which day.
        (timedelta(days=5, hours=23), "Mon 11:00 UTC (in 5 d 23 h)"),
        # Six days or more: a weekday alone could be read as this week's, so the date too.
        (timedelta(days=6), "Mon 2027-01-11 12:00 UTC (in 6 d 0 h)"),
        (timedelta(days=6, hours=12), "Tue 2027-01-12 00:00 UTC (in 6 d 12 h)"),
    ],
)
def test_a_far_opening_is_shown_with_its_date(ahead: timedelta, text: str) -> None:
    opening = s.Opening(AT + ahead, None, "UTC")
    assert s.format_opening(opening, AT) == text


def test_an_opening_that_starts_now_is_open_now() -> None:
    assert s.format_opening(s.Opening(AT, None, "UTC"), AT) == "open now"
    closing = s.Opening(AT, AT + timedelta(hours=2), "UTC")
    assert s.format_opening(closing, AT) == "open now until 2027-01-05 14:00 UTC"
    assert s.format_opening(closing, AT - timedelta(minutes=1)) == "Tue 12:00 UTC (in 1 m)"


def _daily_utc(start: time, end: time) -> Window:
    return Window(frozenset(range(7)), start, end, "UTC")


def test_outside_the_windows_the_verdict_names_the_next_opening() -> None:
    schedule = Schedule(windows=(_daily_utc(time(2), time(3)),))
    verdict = s.can_update_now(schedule, NORMAL, AT)
    assert (verdict.allowed, verdict.hold) == (False, Hold.WINDOW)
    assert verdict.opening == s.Opening(
        datetime(2027, 1, 6, 2, tzinfo=UTC), datetime(2027, 1, 6, 3, tzinfo=UTC), "UTC"
    )


def test_no_window_within_the_horizon_is_said_plainly() -> None:
    # A three-year freeze from the next hour: every window until then falls inside it.
    freeze = s.Blackout("migration", AT + timedelta(hours=1), AT + timedelta(days=3 * 365))
    schedule = Schedule(windows=(_daily_utc(time(2), time(3)),), blackouts=(freeze,))
    verdict = s.can_update_now(schedule, NORMAL, AT)
    assert verdict == s.Verdict(
        False, Hold.WINDOW, "no maintenance window in the next two years", None
    )


def test_every_blackout_inside_a_window_is_cut_out_of_it() -> None:
    day = datetime(2027, 1, 6, tzinfo=UTC)
    schedule = Schedule(
        windows=(_daily_utc(time(2), time(6)),),
        blackouts=(
            # Before the window, then inside it.
            s.Blackout("early", day, day.replace(hour=1)),
            s.Blackout("inside", day.replace(hour=3), day.replace(hour=4)),
        ),
    )
    assert s.next_window(schedule, day.replace(minute=30)) == s.Opening(
        day.replace(hour=2), day.replace(hour=3), "UTC"
    )


def test_a_blackout_at_the_start_of_a_window_moves_its_opening() -> None:
    day = datetime(2027, 1, 6, tzinfo=UTC)
    schedule = Schedule(
        windows=(_daily_utc(time(2), time(4)),),
        blackouts=(s.Blackout("first hour", day.replace(hour=2), day.replace(hour=3)),),
    )
    assert s.next_window(schedule, day.replace(hour=1)) == s.Opening(
        day.replace(hour=3), day.replace(hour=4), "UTC"
    )


def test_a_window_that_closes_at_the_instant_asked_about_is_not_the_next_opening() -> None:
    schedule = Schedule(windows=(_daily_utc(time(2), time(3)),))
    closing = datetime(2027, 1, 6, 3, tzinfo=UTC)
    assert s.next_window(schedule, closing) == s.Opening(
        datetime(2027, 1, 7, 2, tzinfo=UTC), datetime(2027, 1, 7, 3, tzinfo=UTC), "UTC"
    )


def test_adjacent_windows_are_one_opening_from_either_one() -> None:
    schedule = Schedule(windows=(_daily_utc(time(1), time(2)), _daily_utc(time(2), time(3))))
    whole = s.Opening(
        datetime(2027, 1, 6, 1, tzinfo=UTC), datetime(2027, 1, 6, 3, tzinfo=UTC), "UTC"
    )
    assert s.next_window(schedule, datetime(2027, 1, 6, 1, 30, tzinfo=UTC)) == whole
    assert s.next_window(schedule, datetime(2027, 1, 6, 2, 30, tzinfo=UTC)) == whole


@pytest.fixture
def host_far_east(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's own clock fourteen hours ahead of UTC: the scheduler must never read it."""
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    clock.tzset()
    yield
    monkeypatch.undo()
    clock.tzset()


@pytest.mark.usefixtures("host_far_east")
def test_an_occurrence_from_the_day_before_is_found_whatever_the_hosts_timezone() -> None:
    # A whole-day window in UTC-12 opening at 23:30 runs until 23:30 the next day. At 23:00
    # there on 5 January (11:00 UTC on the 6th; already the 7th on the host) it is the
    # occurrence of the 4th that is open.
    window = Window(frozenset(range(7)), time(23, 30), time(23, 30), "Etc/GMT+12")
    lo = datetime(2027, 1, 6, 11, 0, tzinfo=UTC)
    spans = list(s.window_occurrences(window, lo, lo + timedelta(minutes=1)))
    assert [(w.start, w.end) for w in spans] == [
        (datetime(2027, 1, 5, 11, 30, tzinfo=UTC), datetime(2027, 1, 6, 11, 30, tzinfo=UTC))
    ]
