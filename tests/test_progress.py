"""Progress without a terminal: a line at every 10% (and at the end), none when disabled."""

from __future__ import annotations

import io

from poise.progress import track


def fake_clock(monkeypatch, step: float) -> None:
    import itertools

    import poise.progress

    ticks = itertools.count(0.0, step)
    monkeypatch.setattr(poise.progress.time, "monotonic", lambda: next(ticks))


def test_without_a_terminal_a_line_at_every_tenth_and_at_the_end(monkeypatch) -> None:
    fake_clock(monkeypatch, 1.0)
    stream = io.StringIO()
    with track("features (adam)", 40, unit="examples", stream=stream) as progress:
        for _ in range(20):
            progress.advance(2, tokens=300)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # 4, 8, ..., 40 of 40: each crosses a tenth
    assert lines[0].startswith("poise: features (adam): 4/40 examples (10%)")
    assert lines[-1].startswith("poise: features (adam): 40/40 examples (100%)") and "tokens/s" in lines[-1]
    assert "left" not in lines[-1]


def test_resumed_work_counts_from_what_was_done_and_disabled_prints_nothing() -> None:
    stream = io.StringIO()
    with track("warmup", 10, unit="steps", done=6, stream=stream) as progress:
        progress.advance(4, loss="0.5")
    assert stream.getvalue().splitlines()[-1].startswith("poise: warmup: 10/10 steps (100%)")
    assert "loss 0.5" in stream.getvalue()
    quiet = io.StringIO()
    with track("warmup", 10, stream=quiet, enabled=False) as progress:
        progress.advance(10)
    assert quiet.getvalue() == ""


def test_no_rate_is_shown_for_work_that_took_almost_no_time(monkeypatch) -> None:
    fake_clock(monkeypatch, 1e-6)
    stream = io.StringIO()
    with track("attribute", 400, unit="rows", stream=stream) as progress:
        progress.advance(400)
    assert stream.getvalue().splitlines()[-1].startswith("poise: attribute: 400/400 rows (100%)")
    assert "/s" not in stream.getvalue()
