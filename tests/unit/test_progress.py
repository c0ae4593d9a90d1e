"""Progress: the periodic lines a step logs (transferkit.progress) and the console that shows
them in the running step's line (a terminal) or as plain lines (a log)."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest

from transferkit import console, progress
from transferkit.console import Console
from transferkit.progress import Ticker, duration

LINE = re.compile(
    r"^embed train: (\d+)/10 batches \((\d+)%\), [\d.]+ (batches/s|s/batch), "
    r"(ETA \d+ s|took \d+ s)$"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transferkit.progress"]


def test_a_ticker_says_done_of_total_rate_and_eta_each_interval_and_always_the_last(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="transferkit.progress")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    ticker = Ticker("embed train", 10)
    for done in range(1, 11):
        ticker.update(done)
    found = lines(caplog)
    assert [LINE.match(line).group(1) for line in found] == [str(n) for n in range(1, 11)]  # type: ignore[union-attr]
    assert found[4].endswith("ETA 0 s")
    assert "(50%)" in found[4]
    assert found[-1].endswith("took 0 s")


def test_within_the_interval_only_the_last_line_is_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="transferkit.progress")
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    for _ in progress.progress(range(10), 10, "embed train"):
        pass
    assert len(lines(caplog)) == 1
    assert LINE.match(lines(caplog)[0])


def test_a_bad_interval_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "often")
    assert progress.interval() == progress.DEFAULT_INTERVAL
    monkeypatch.setenv(progress.INTERVAL_ENV, "-5")
    assert progress.interval() == 0.0


def test_the_rate_of_a_resumed_loop_counts_only_what_it_did(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="transferkit.progress")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    ticker = Ticker("train", 1000, "step")
    time.sleep(0.05)
    ticker.update(901, "epoch 2.0, loss 0.5000")  # resumed at 900: one step in 0.05 s
    rate = float(re.search(r"([\d.]+) steps/s", lines(caplog)[0]).group(1))  # type: ignore[union-attr]
    assert rate < 100  # 901 steps counted would be ~18,000/s
    assert lines(caplog)[0].endswith(", epoch 2.0, loss 0.5000")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.4, "0 s"), (42.5, "42 s"), (185, "3 min 05 s"), (3720, "1 h 02 min"), (-3, "0 s")],
)
def test_durations_read_as_a_person_says_them(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


EMBEDDING = "progress extract_features embed train: 3/10 batches (30%), 2.0 batches/s, ETA 4 s"


def extracting(monkeypatch: pytest.MonkeyPatch, redraw: float, columns: int) -> tuple:
    """A terminal ``columns`` wide and its console, in extract_features with one progress
    line shown; redrawn each ``redraw`` seconds."""
    monkeypatch.setattr(console, "REDRAW_EVERY", redraw)
    monkeypatch.setenv("COLUMNS", str(columns))
    out = Terminal()
    screen = Console(out)
    screen("start extract_features")
    screen(EMBEDDING)
    return out, screen


def test_on_a_terminal_the_running_line_shows_the_latest_progress_and_is_redrawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, screen = extracting(monkeypatch, 0.02, 200)
    shown = out.getvalue()
    assert shown.endswith("running… 0 s  embed train: 3/10 batches (30%), 2.0 batches/s, ETA 4 s")
    assert "\n" not in shown  # one line, rewritten in place
    # Nothing arrives for a while: the line is still redrawn (its elapsed time moves on).
    before = out.getvalue().count("\r\x1b[2K")
    time.sleep(0.3)
    assert out.getvalue().count("\r\x1b[2K") >= before + 3
    screen("done extract_features 12.3")
    screen.close()
    assert out.getvalue().endswith("\r\x1b[2K  ✓ extract_features     12.3 s\n")
    after = out.getvalue()
    time.sleep(0.1)
    assert out.getvalue() == after  # no running step, nothing redrawn


def test_a_warning_goes_above_the_running_line_which_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(console, "REDRAW_EVERY", 3600)
    out = Terminal()
    screen = Console(out)
    screen("start train")
    screen("log WARNING transferkit.training the loss is high")
    screen.close()
    assert "    warning: the loss is high\n" in out.getvalue()
    assert out.getvalue().rstrip("\r\x1b[2K").endswith("▸ train             running… 0 s")


def test_the_running_line_never_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    out, screen = extracting(monkeypatch, 3600, 50)
    screen.close()
    drawn = [part for part in out.getvalue().split("\r\x1b[2K") if part]
    assert drawn
    assert max(len(part) for part in drawn) == 49


def test_quiet_shows_the_step_lines_without_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "REDRAW_EVERY", 3600)
    out = Terminal()
    screen = Console(out, quiet=True)
    screen("start train")
    screen("progress train train: 5/100 steps (5%), 1.0 steps/s, ETA 95 s")
    screen("done train 1.0")
    screen.close()
    assert "steps" not in out.getvalue()
    assert "✓ train" in out.getvalue()


def test_in_a_log_progress_comes_as_plain_lines_at_most_one_per_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    screen = Console(out)
    screen("start train")
    screen("progress train train: 1/100 steps (1%), 1.0 steps/s, ETA 99 s")  # too soon
    monkeypatch.setattr(console, "PLAIN_EVERY", 0.0)
    screen("progress train train: 2/100 steps (2%), 1.0 steps/s, ETA 98 s")
    screen("done train 2.0")
    screen.close()
    assert out.getvalue() == (
        "  ▸ train             running…\n"
        "    train: train: 2/100 steps (2%), 1.0 steps/s, ETA 98 s\n"
        "  ✓ train                 2.0 s\n"
    )
    assert "\r" not in out.getvalue()
