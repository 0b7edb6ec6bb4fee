"""The releases/denials-per-hour chart as server-side SVG geometry (the template draws it; no JS)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from .data import HourCount

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 36, 8, 10, 24


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    kind: str        # "release" | "denial": the CSS class that colours it
    title: str       # hover text


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: tuple[Bar, ...]
    xlabels: tuple[Label, ...]
    ylabels: tuple[Label, ...]
    baseline: float
    total_releases: int
    total_denials: int


def _nice_max(n: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if n <= step * 4:
            return step * 4
    return n


def hourly_chart(hours: list[HourCount]) -> Chart:
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    top = _nice_max(max([1] + [max(h.releases, h.denials) for h in hours]))
    slot = plot_w / max(1, len(hours))
    bar_w = max(1.0, slot * 0.38)
    base = TOP + plot_h
    bars: list[Bar] = []
    xl: list[Label] = []
    for i, h in enumerate(hours):
        x0 = LEFT + i * slot + slot * 0.1
        hour = datetime.fromtimestamp(h.start_ms / 1000, UTC).strftime("%Y-%m-%d %H:00")
        for j, (n, kind, word) in enumerate(((h.releases, "release", "releases"), (h.denials, "denial", "denials"))):
            bh = plot_h * n / top
            bars.append(Bar(round(x0 + j * bar_w, 2), round(base - bh, 2), round(bar_w, 2), round(bh, 2), kind,
                            f"{hour} UTC: {n} {word}"))
        if i % 6 == 0:
            xl.append(Label(round(LEFT + i * slot, 2), HEIGHT - 6,
                            datetime.fromtimestamp(h.start_ms / 1000, UTC).strftime("%H:00")))
    yl = tuple(Label(LEFT - 4, round(base - plot_h * k / 4, 2) + 4, str(top * k // 4)) for k in range(5))
    return Chart(WIDTH, HEIGHT, tuple(bars), tuple(xl), yl, base,
                 sum(h.releases for h in hours), sum(h.denials for h in hours))
