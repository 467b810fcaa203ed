"""Small server-rendered SVG pictures: a rollout's stage timeline and the
canary-vs-baseline metrics. Escaped text only; no JavaScript."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from updates.models import Rollout
from updates.rollout_options import GateOptions
from updates.rollouts.selectors import MetricsComparison

STATE_COLOURS = {
    "DONE": "#1f9d55",
    "RUNNING": "#2f6fd6",
    "WAITING": "#d98e04",
    "FAILED": "#d64545",
    "ROLLED_BACK": "#e07b39",
    "SKIPPED": "#c4cad3",
    "PENDING": "#e6e9ee",
}


def stage_timeline_svg(
    rollout: Rollout, stage_counts: Mapping[int, Mapping[str, int]]
) -> SafeString:
    """One block per stage, filled by its nodes' states (counts per stage and row state);
    the current stage outlined."""
    stages = sorted(stage_counts) or [0]
    width, height, gap = 720, 64, 10
    block = (width - gap * (len(stages) - 1)) / len(stages)
    fractions = rollout.opts.stage_fractions
    parts = [
        f'<svg class="timeline" viewBox="0 0 {width} {height + 22}" role="img" '
        f'aria-label="stage timeline" xmlns="http://www.w3.org/2000/svg">'
    ]
    total = sum(sum(counts.values()) for counts in stage_counts.values())
    reached = 0
    for index, stage in enumerate(stages):
        x = index * (block + gap)
        counts = stage_counts.get(stage, {})
        members = sum(counts.values())
        reached += members
        parts.append(_stage_block(x, block, height, counts, stage == rollout.current_stage))
        label = f"stage {stage + 1} · {members} node{'s' if members != 1 else ''}"
        if rollout.strategy == Rollout.Strategy.CANARY and stage < len(fractions) and total:
            # What the stage reaches of the targeted nodes, not the fraction asked for: one
            # node of three is 33 %, though the first stage asked for 1 %.
            label += f" · {_reached(reached, total)} of {total}"
        parts.append(
            f'<text x="{x + 4:.1f}" y="{height + 16}" font-size="12" fill="#475467">'
            f"{escape(label)}</text>"
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above is escaped


def _reached(reached: int, total: int) -> str:
    share = 100 * reached / total
    return f"{share:.0f} %" if share >= 1 or share == 0 else f"{share:.1g} %"


def _stage_block(
    x: float, width: float, height: int, counts: Mapping[str, int], current: bool
) -> str:
    total = max(1, sum(counts.values()))
    parts = [
        f'<g><rect x="{x:.1f}" y="0" width="{width:.1f}" height="{height}" rx="6" fill="#f2f4f7"/>'
    ]
    offset = x
    for state in ("DONE", "ROLLED_BACK", "FAILED", "RUNNING", "WAITING", "SKIPPED"):
        if counts.get(state):
            w = width * counts[state] / total
            parts.append(
                f'<rect x="{offset:.1f}" y="0" width="{w:.1f}" height="{height}" '
                f'fill="{STATE_COLOURS[state]}">'
                f"<title>{counts[state]} {state.lower()}</title></rect>"
            )
            offset += w
    if current:
        parts.append(
            f'<rect x="{x + 1:.1f}" y="1" width="{width - 2:.1f}" height="{height - 2}" rx="6" '
            'fill="none" stroke="#18202c" stroke-width="2"/>'
        )
    parts.append("</g>")
    return "".join(parts)


def metrics_chart_svg(metrics: MetricsComparison, gate: GateOptions) -> SafeString:
    """Two bar pairs (error rate, p99 latency), canary vs baseline, with the gate line."""
    bars: list[tuple[str, float | None, float | None, float, Callable[[float], str]]] = [
        (
            "error rate",
            metrics.canary_error_rate,
            metrics.baseline_error_rate,
            gate.max_error_rate,
            lambda v: f"{v * 100:.2f} %",
        ),
        (
            "p99 latency",
            metrics.canary_p99_ms,
            metrics.baseline_p99_ms,
            gate.max_p99_ms,
            lambda v: f"{v:.0f} ms",
        ),
    ]
    width, row_height = 520, 70
    parts = [
        f'<svg class="metrics" viewBox="0 0 {width} {row_height * len(bars) + 10}" role="img" '
        f'aria-label="canary versus baseline" xmlns="http://www.w3.org/2000/svg">'
    ]
    for index, (name, canary, baseline, limit, fmt) in enumerate(bars):
        y = index * row_height + 6
        scale = max([v for v in (canary, baseline, limit) if v is not None] + [1e-9]) * 1.15
        parts.append(
            f'<text x="0" y="{y + 12}" font-size="12" fill="#475467">{escape(name)}</text>'
        )
        for offset, label, value, colour in (
            (18, "canary", canary, "#2f6fd6"),
            (38, "baseline", baseline, "#98a2b3"),
        ):
            w = 0 if value is None else 380 * value / scale
            text = "no data" if value is None else fmt(value)
            parts.append(
                f'<text x="0" y="{y + offset + 11}" font-size="11" fill="#667085">{label}</text>'
                f'<rect x="70" y="{y + offset}" width="{w:.1f}" height="14" fill="{colour}"/>'
                f'<text x="{76 + w:.1f}" y="{y + offset + 11}" font-size="11">{escape(text)}</text>'
            )
        gx = 70 + 380 * limit / scale
        parts.append(
            f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{y + 14}" y2="{y + 56}" stroke="#d64545" '
            f'stroke-dasharray="4 3"><title>gate {escape(fmt(limit))}</title></line>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above is escaped
