"""Hybrid logical clock timestamps: format, order, and what is refused."""

from __future__ import annotations

import pytest

from p2p.proto.clock import HybridClock, format_ts, is_ts, parse_ts


def test_timestamps_sort_as_time_and_parse_back() -> None:
    clock = HybridClock()
    stamps = [clock.now(1_767_225_600_000) for _ in range(3)] + [clock.now(1_767_225_600_001)]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 4
    assert all(is_ts(s) for s in stamps)
    assert parse_ts(format_ts(1_767_225_600_000, 7)) == (1_767_225_600_000, 7)


@pytest.mark.parametrize(
    "text",
    [
        "1767225600000.000000\n",  # a trailing newline ($ would take it)
        "\u0661767225600000.000000",  # an Arabic-Indic digit (\d would take it)
        "1767225600000.00000",
        " 1767225600000.000000",
        "1767225600000,000000",
        "",
    ],
)
def test_malformed_timestamps_are_refused(text: str) -> None:
    assert not is_ts(text)
    with pytest.raises(ValueError, match="not a timestamp"):
        parse_ts(text)
