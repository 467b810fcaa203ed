"""The scheduler's rules, DST edges spelled out by hand (the documented semantics)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from tenants import scheduler as s
from tenants.scheduler import (
    Blackout,
    ConsentState,
    Hold,
    Policy,
    ReleaseInfo,
    Schedule,
    Window,
    can_update_now,
    next_window,
)

NY = "America/New_York"
DAILY = frozenset(range(7))
NORMAL = ReleaseInfo("1.7.0")
CRITICAL = ReleaseInfo("1.7.1", s.CRITICAL)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def allowed(schedule: Schedule, at: datetime, release: ReleaseInfo = NORMAL) -> bool:
    return can_update_now(schedule, release, at).allowed


def daily(start: str, end: str, tz: str = NY, days: frozenset[int] = DAILY) -> Window:
    return Window(days, time.fromisoformat(start), time.fromisoformat(end), tz)


# --- DST: the documented semantics ------------------------------------------


def test_spring_forward_window_in_the_skipped_hour_opens_at_the_jump_for_its_full_length() -> None:
    # 2027-03-14: New York jumps from 02:00 EST to 03:00 EDT (07:00 UTC).
    schedule = Schedule(windows=(daily("02:00", "03:00"),))
    assert not allowed(schedule, utc(2027, 3, 14, 6, 59, 59))
    assert allowed(schedule, utc(2027, 3, 14, 7))  # 03:00 EDT
    assert allowed(schedule, utc(2027, 3, 14, 7, 59, 59))
    assert not allowed(schedule, utc(2027, 3, 14, 8))  # 04:00 EDT: one hour, not zero
    opening = next_window(schedule, utc(2027, 3, 14, 0))
    assert opening is not None
    assert (opening.start, opening.end) == (utc(2027, 3, 14, 7), utc(2027, 3, 14, 8))
    assert opening.local_start.strftime("%H:%M %Z") == "03:00 EDT"


def test_spring_forward_start_inside_the_gap_opens_at_the_jump_not_later() -> None:
    schedule = Schedule(windows=(daily("02:30", "03:30"),))
    opening = next_window(schedule, utc(2027, 3, 14, 0))
    assert opening is not None
    assert opening.start == utc(2027, 3, 14, 7)  # 03:00 EDT, when the clock passes 02:30
    assert opening.end is not None
    assert opening.end - opening.start == timedelta(hours=1)


def test_fall_back_window_in_the_repeated_hour_runs_once_from_the_first_occurrence() -> None:
    # 2027-11-07: 02:00 EDT becomes 01:00 EST (06:00 UTC); 01:00-02:00 happens twice.
    schedule = Schedule(windows=(daily("01:00", "02:00"),))
    assert not allowed(schedule, utc(2027, 11, 7, 4, 59))
    assert allowed(schedule, utc(2027, 11, 7, 5))  # 01:00 EDT
    assert allowed(schedule, utc(2027, 11, 7, 5, 59))
    assert not allowed(schedule, utc(2027, 11, 7, 6))  # 01:00 EST: the repeat is outside
    assert not allowed(schedule, utc(2027, 11, 7, 6, 30))
    opening = next_window(schedule, utc(2027, 11, 7, 0))
    assert opening is not None
    assert opening.end is not None
    assert opening.end - opening.start == timedelta(hours=1)
    # The label says which 01:00 is meant.
    assert s.format_opening(opening) == "Sun 01:00 EDT America/New_York"


def test_overnight_window_spanning_a_change_keeps_its_real_length() -> None:
    schedule = Schedule(windows=(daily("22:00", "02:00", days=frozenset({5})),))  # Sat
    opening = next_window(schedule, utc(2027, 11, 6, 12))
    assert opening is not None
    assert opening.start == utc(2027, 11, 7, 2)  # Sat 22:00 EDT
    assert opening.end is not None
    assert opening.end - opening.start == timedelta(hours=4)
    assert opening.end.astimezone(s.zone(NY)).strftime("%H:%M %Z") == "01:00 EST"


def test_half_hour_dst_lord_howe() -> None:
    # Lord Howe moves its clocks by 30 minutes: 2027-10-03 02:00 -> 02:30 local.
    schedule = Schedule(windows=(daily("02:00", "03:00", "Australia/Lord_Howe"),))
    opening = next_window(schedule, utc(2027, 10, 2, 12))
    assert opening is not None
    local = opening.local_start
    assert (local.hour, local.minute) == (2, 30)
    assert opening.end is not None
    assert opening.end - opening.start == timedelta(hours=1)


def test_london_spring_forward_with_a_start_in_the_gap() -> None:
    # 2027-03-28 01:00 GMT -> 02:00 BST at 01:00 UTC.
    schedule = Schedule(windows=(daily("01:30", "02:30", "Europe/London"),))
    opening = next_window(schedule, utc(2027, 3, 28, 0))
    assert opening is not None
    assert (opening.start, opening.end) == (utc(2027, 3, 28, 1), utc(2027, 3, 28, 2))


def test_local_to_utc_gap_and_fold() -> None:
    assert s.local_to_utc(datetime(2027, 3, 14, 2, 15), NY) == utc(2027, 3, 14, 7)
    assert s.local_to_utc(datetime(2027, 11, 7, 1, 30), NY) == utc(2027, 11, 7, 5, 30)
    assert s.local_to_utc(datetime(2027, 7, 1, 12), NY) == utc(2027, 7, 1, 16)


# --- windows --------------------------------------------------------------------


def test_window_crossing_midnight_belongs_to_the_day_it_starts() -> None:
    friday_night = Schedule(windows=(daily("22:00", "02:00", "UTC", frozenset({4})),))
    assert allowed(friday_night, utc(2027, 1, 8, 23))  # Fri 23:00
    assert allowed(friday_night, utc(2027, 1, 9, 1, 59))  # Sat 01:59
    assert not allowed(friday_night, utc(2027, 1, 9, 2))
    assert not allowed(friday_night, utc(2027, 1, 9, 23))  # Sat night: not a Friday
    assert not allowed(friday_night, utc(2027, 1, 8, 1))  # Fri 01:00 belongs to Thursday


def test_equal_start_and_end_is_a_whole_day() -> None:
    sunday = Schedule(windows=(daily("00:00", "00:00", "UTC", frozenset({6})),))
    assert allowed(sunday, utc(2027, 1, 10, 0))
    assert allowed(sunday, utc(2027, 1, 10, 23, 59))
    assert not allowed(sunday, utc(2027, 1, 11, 0))


def test_several_windows_and_adjacent_ones_merge_into_one_opening() -> None:
    schedule = Schedule(windows=(daily("01:00", "02:00", "UTC"), daily("02:00", "03:00", "UTC")))
    opening = next_window(schedule, utc(2027, 1, 1, 0))
    assert opening is not None
    assert (opening.start, opening.end) == (utc(2027, 1, 1, 1), utc(2027, 1, 1, 3))


def test_no_windows_means_any_time_outside_blackouts() -> None:
    assert allowed(Schedule(), utc(2027, 6, 1, 12))
    opening = next_window(Schedule(), utc(2027, 6, 1, 12))
    assert opening is not None
    assert opening.is_open(utc(2027, 6, 1, 12)) and opening.end is None


def test_next_window_label_with_countdown() -> None:
    schedule = Schedule(windows=(daily("02:00", "04:00", days=frozenset({5})),))  # Sat
    now = utc(2027, 1, 9, 3, 48)  # Fri 22:48 EST
    opening = next_window(schedule, now)
    assert opening is not None
    assert opening.start == utc(2027, 1, 9, 7)
    assert s.format_opening(opening, now) == "Sat 02:00 America/New_York (in 3 h 12 m)"
    assert s.format_opening(opening, utc(2027, 1, 9, 7, 30)).startswith("open now until ")
    # A week or more away, the date is spelled out.
    frozen = Schedule(
        windows=schedule.windows, blackouts=(Blackout("x", utc(2027, 1, 1), utc(2027, 1, 3)),)
    )
    far = utc(2027, 1, 1, 12)
    far_opening = next_window(frozen, far)
    assert far_opening is not None
    label = s.format_opening(far_opening, far)
    assert label == "Sat 2027-01-09 02:00 America/New_York (in 7 d 19 h)"


def test_format_duration() -> None:
    assert s.format_duration(timedelta(seconds=30)) == "less than a minute"
    assert s.format_duration(timedelta(minutes=5, seconds=59)) == "5 m"
    assert s.format_duration(timedelta(days=2, hours=3, minutes=4)) == "2 d 3 h"


# --- blackouts ------------------------------------------------------------------


def q4_freeze(yearly: bool = False) -> Blackout:
    return Blackout(
        "Q4 freeze",
        s.local_to_utc(datetime(2026, 12, 20), "Europe/London"),
        s.local_to_utc(datetime(2027, 1, 3), "Europe/London"),
        "Europe/London",
        yearly,
    )


def test_blackout_beats_a_window_and_names_itself() -> None:
    schedule = Schedule(windows=(daily("00:00", "00:00", "UTC"),), blackouts=(q4_freeze(),))
    verdict = can_update_now(schedule, NORMAL, utc(2026, 12, 24, 12))
    assert not verdict.allowed and verdict.hold is Hold.WINDOW
    assert verdict.reason == "blackout 'Q4 freeze' until 2027-01-03 00:00 Europe/London"
    assert verdict.opening is not None
    assert verdict.opening.start == utc(2027, 1, 3)
    assert allowed(schedule, utc(2027, 1, 3))


def test_yearly_blackout_repeats_across_the_year_end_but_not_before_its_first_year() -> None:
    schedule = Schedule(blackouts=(q4_freeze(yearly=True),))
    assert not allowed(schedule, utc(2028, 1, 2, 12))
    assert not allowed(schedule, utc(2030, 12, 25))
    assert allowed(schedule, utc(2028, 6, 1))
    assert allowed(schedule, utc(2025, 12, 25))


def test_yearly_blackout_on_29_february_falls_on_the_28th_in_common_years() -> None:
    leap = Blackout("leap", utc(2028, 2, 29), utc(2028, 3, 1), "UTC", yearly=True)
    schedule = Schedule(blackouts=(leap,))
    assert not allowed(schedule, utc(2029, 2, 28, 12))
    assert allowed(schedule, utc(2029, 3, 1, 12))


def test_critical_release_skips_windows_and_consent_but_never_a_blackout() -> None:
    policy = Policy(requires_consent=True, auto_apply_critical=True)
    schedule = Schedule(windows=(daily("02:00", "03:00"),), blackouts=(q4_freeze(),), policy=policy)
    assert allowed(schedule, utc(2027, 2, 1, 12), CRITICAL)
    assert not allowed(schedule, utc(2026, 12, 24), CRITICAL)
    strict = Schedule(windows=schedule.windows, policy=Policy(auto_apply_critical=False))
    assert not allowed(strict, utc(2027, 2, 1, 12), CRITICAL)


# --- consent --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "needed"),
    [
        (Policy(), False),
        (Policy(requires_consent=True), True),
        (Policy(auto_update=False), True),
    ],
)
def test_when_consent_is_needed(policy: Policy, needed: bool) -> None:
    assert s.consent_needed(policy, NORMAL) is needed
    assert s.consent_needed(policy, CRITICAL) is False


def test_consent_states() -> None:
    schedule = Schedule(policy=Policy(requires_consent=True), tenant_name="Tenant A")
    at = utc(2027, 1, 5)
    none = can_update_now(schedule, NORMAL, at)
    assert none.hold is Hold.CONSENT
    assert none.reason == "waiting for consent from Tenant A's admins for 1.7.0"
    declined = can_update_now(schedule, NORMAL, at, ConsentState(False, "alice", "peak season"))
    assert declined.reason == "consent for 1.7.0 declined by alice: peak season"
    expired = can_update_now(schedule, NORMAL, at, ConsentState(True, "alice", "", at))
    assert expired.hold is Hold.CONSENT and "expired" in expired.reason
    granted = ConsentState(True, "alice", "", at + timedelta(days=1))
    assert can_update_now(schedule, NORMAL, at, granted).allowed


def test_consent_is_asked_before_the_window() -> None:
    schedule = Schedule(windows=(daily("02:00", "03:00"),), policy=Policy(requires_consent=True))
    verdict = can_update_now(schedule, NORMAL, utc(2027, 1, 5, 12))
    assert verdict.hold is Hold.CONSENT
    granted = ConsentState(True, "alice")
    verdict = can_update_now(schedule, NORMAL, utc(2027, 1, 5, 12), granted)
    assert verdict.hold is Hold.WINDOW
    assert verdict.reason == "outside maintenance windows; next window Wed 02:00 America/New_York"


# --- window edges, validation ---------------------------------------------------


def test_a_window_opens_on_its_first_minute() -> None:
    schedule = Schedule(windows=(daily("02:00", "03:00"),))
    assert not s.can_update_now(schedule, NORMAL, utc(2027, 1, 5, 6, 59)).allowed
    assert s.can_update_now(schedule, NORMAL, utc(2027, 1, 5, 7)).allowed
    opening = s.next_window(schedule, utc(2027, 1, 5, 6, 59))
    assert opening is not None
    assert opening.start == utc(2027, 1, 5, 7)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "utc "])
def test_unknown_timezones_are_rejected(tz: str) -> None:
    with pytest.raises(s.InvalidSchedule):
        daily("01:00", "02:00", tz)


def test_invalid_blackouts_are_rejected() -> None:
    with pytest.raises(s.InvalidSchedule):
        Blackout("x", utc(2027, 1, 2), utc(2027, 1, 1))
    with pytest.raises(s.InvalidSchedule):
        Blackout("x", utc(2027, 1, 1), utc(2028, 1, 1), yearly=True)
    with pytest.raises(s.InvalidSchedule):
        Window(frozenset(), time(1), time(2), "UTC")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (daily("01:00", "03:00"), daily("02:00", "04:00"), True),
        (daily("01:00", "02:00"), daily("02:00", "03:00"), False),
        (daily("22:00", "02:00"), daily("01:00", "03:00"), True),
        (
            daily("22:00", "02:00", days=frozenset({6})),  # Sun night into Mon
            daily("01:00", "03:00", days=frozenset({0})),
            True,
        ),
        (
            daily("01:00", "02:00", days=frozenset({0})),
            daily("01:00", "02:00", days=frozenset({1})),
            False,
        ),
        (daily("01:00", "02:00", "UTC"), daily("20:30", "21:30", NY), True),  # 01:30 UTC
        (daily("01:00", "02:00", "UTC"), daily("10:00", "11:00", NY), False),
    ],
)
def test_windows_overlap(a: Window, b: Window, overlap: bool) -> None:
    assert s.windows_overlap(a, b) is overlap
    assert s.windows_overlap(b, a) is overlap


def test_a_yearly_blackout_in_the_repeated_dst_hour_holds_its_own_instant() -> None:
    # 06:00 UTC on 2028-11-05 is the second 01:00 in New York (clocks went back at 02:00).
    blackout = s.Blackout(
        name="b",
        start=utc(2028, 11, 5, 6, 0),
        end=utc(2028, 11, 5, 6, 1),
        tz=NY,
        yearly=True,
    )
    schedule = Schedule(blackouts=(blackout,))
    verdict = s.can_update_now(schedule, NORMAL, utc(2028, 11, 5, 6, 0))
    assert not verdict.allowed
    assert verdict.reason.startswith("blackout 'b' until ")
    # The next year's occurrence reads the wall time again (its first reading).
    spans = list(s.blackout_occurrences(blackout, utc(2029, 1, 1), utc(2030, 1, 1)))
    assert [(span.start, span.end) for span in spans] == [
        (utc(2029, 11, 5, 6, 0), utc(2029, 11, 5, 6, 1))
    ]


def test_an_opening_still_open_the_horizon_after_it_was_asked_about_has_no_end() -> None:
    """A window the whole day, every day, in New York: contiguous but for the hour the
    clocks go back (2028-11-05 06:00-07:00 UTC, the 24 hours from 02:00 EDT ending at 01:00
    EST). Asked on 23 September, that gap lies beyond the horizon: no end is named (the end
    used to be measured from the first chunk's edge, so it named 5 November)."""
    every_day = Window(days=frozenset(range(7)), start=time(2), end=time(2), tz=NY)
    schedule = Schedule(windows=(every_day,))
    asked = datetime(2028, 9, 23, 13, 59, tzinfo=UTC)
    opening = s.next_window(schedule, asked)
    assert opening is not None and opening.start <= asked and opening.end is None
    # Asked within the horizon of the gap, its end is named.
    close = datetime(2028, 11, 5, 6, 0, tzinfo=UTC)
    late = s.next_window(schedule, close - s.END_HORIZON + timedelta(minutes=1))
    assert late is not None and late.end == close
    # The horizon is half-open, as the walk's: a close exactly at its end is not named.
    edge = s.next_window(schedule, close - s.END_HORIZON)
    assert edge is not None and edge.end is None
