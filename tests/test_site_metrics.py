"""MetricHistory (zcore.site.metrics): tiers, downsampling against the raw samples, range
queries, bounded memory, and snapshots that survive a restart or are set aside when
damaged."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError
from zcore.site.metrics import DEFAULT_TIERS, MetricHistory, Series, Tier

T0 = 1_800_000_000.0  # a multiple of every default tier width
RPO = Series.RPO


def _f32(x: float) -> float:
    return float(np.float32(x))


def _raw_buckets(samples: list[tuple[float, float]], width: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for t, v in samples:
        out.setdefault(int(t // width), []).append(v)
    return out


@given(samples=st.lists(st.tuples(st.floats(0, 3000), st.floats(-1e6, 1e6)), min_size=1,
                        max_size=200))
def test_every_tier_holds_min_avg_max_of_the_raw_samples_in_each_bucket(samples):
    history = MetricHistory(tiers=(Tier(5, 720), Tier(60, 60), Tier(600, 10)))
    samples = [(T0 + t, v) for t, v in sorted(samples)]
    for t, v in samples:
        history.record("vpg", RPO, v, now=t)
    for tier in history.tiers:
        got = history.query("vpg", RPO, T0, T0 + 3000, resolution=tier.width)
        assert got.resolution == tier.width
        raw = _raw_buckets(samples, tier.width)
        assert got.times == [b * tier.width for b in sorted(raw)]
        for i, b in enumerate(sorted(raw)):
            values = raw[b]
            assert got.count[i] == len(values)
            assert got.min[i] == _f32(min(values))
            assert got.max[i] == _f32(max(values))
            assert got.avg[i] == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-6)


def test_query_picks_the_finest_tier_that_reaches_back_to_the_start():
    history = MetricHistory()
    now = T0 + 3 * 86400
    for k in range(0, 3 * 86400, 5):  # three days of 5-second samples
        history.record("vpg", RPO, k % 100, now=T0 + k)
    assert history.query("vpg", RPO, now - 600, now).resolution == 5  # last hour: 5 s
    assert history.query("vpg", RPO, now - 7200, now).resolution == 60  # two hours: 1 min
    assert history.query("vpg", RPO, now - 2 * 86400, now).resolution == 600
    last_hour = history.query("vpg", RPO, now - 3600 + 5, now)
    assert len(last_hour.times) == 720 - 1
    assert all(c == 1 for c in last_hour.count)
    day = history.query("vpg", RPO, now - 86400 + 60, now, resolution=60)
    assert all(c == 12 for c in day.count) and len(day.times) == 1439
    # a range entirely inside one bucket
    assert history.query("vpg", RPO, now - 48, now - 47).times == [now - 50]
    assert history.query("vpg", RPO, now - 50, now - 45).times == [now - 50, now - 45]
    # a sample in the current bucket: the hour before it is still the 5-second tier's (a
    # browser's "last hour" once flipped to 1-minute buckets whenever a sample was fresh)
    history.record("vpg", RPO, 7, now=now)
    assert history.query("vpg", RPO, now - 3600, now).resolution == 5


def test_samples_older_than_a_tier_s_window_are_not_kept_in_it():
    history = MetricHistory(tiers=(Tier(5, 12), Tier(60, 10)))
    history.record("vpg", RPO, 1.0, now=T0 + 1000)
    history.record("vpg", RPO, 2.0, now=T0)  # 1000 s before: outside the 60 s ring
    fine = history.query("vpg", RPO, T0, T0 + 1000, resolution=5)
    assert fine.avg == [1.0]
    coarse = history.query("vpg", RPO, T0, T0 + 1000, resolution=60)
    assert coarse.avg == [1.0]
    # the ring moved on: a slot's old bucket never shows as a new one
    history.record("vpg", RPO, 3.0, now=T0 + 1000 + 30)
    assert history.query("vpg", RPO, T0, T0 + 2000, resolution=5).avg == [1.0, 3.0]
    history.record("vpg", RPO, 4.0, now=T0 + 1000 + 60)  # the 60 s window passed T0+1000
    assert history.query("vpg", RPO, T0, T0 + 2000, resolution=5).avg == [3.0, 4.0]


def test_memory_per_vpg_is_fixed_whatever_the_number_of_samples():
    history = MetricHistory()
    assert history.bytes_per_vpg == 6480 * (4 + 5 * 20)  # the docstring's figure
    history.record("a", RPO, 1, now=T0)
    one = history.memory_bytes()
    assert one == history.bytes_per_vpg
    for k in range(0, 40 * 86400, 600):  # 40 days, more than the longest window
        for s in Series:
            history.record("a", s, k, now=T0 + k)
    assert history.memory_bytes() == one
    history.record("b", RPO, 1, now=T0)
    assert history.memory_bytes() == 2 * one
    history.forget("a")
    assert history.vpgs == ["b"] and history.memory_bytes() == one


def test_a_snapshot_round_trips_every_ring(tmp_path):
    path = tmp_path / "metrics.state"
    history = MetricHistory(path)
    rng = np.random.default_rng(3)
    for k in range(0, 2 * 86400, 7):
        history.record("vpg-a", Series.JOURNAL_BYTES, float(rng.integers(0, 1 << 40)),
                       now=T0 + k)
        history.record("vpg-b", RPO, float(rng.random()), now=T0 + k)
    history.close()
    again = MetricHistory.open(path)
    assert again.load_error is None and again.vpgs == ["vpg-a", "vpg-b"]
    for vpg, series in (("vpg-a", Series.JOURNAL_BYTES), ("vpg-b", RPO)):
        for tier in DEFAULT_TIERS:
            args = (vpg, series, T0, T0 + 2 * 86400)
            assert again.query(*args, resolution=tier.width) == \
                history.query(*args, resolution=tier.width)
    # recording goes on after a load as it would have before
    history.record("vpg-b", RPO, 9.0, now=T0 + 2 * 86400 + 1)
    again.record("vpg-b", RPO, 9.0, now=T0 + 2 * 86400 + 1)
    assert again.query("vpg-b", RPO, T0, T0 + 3 * 86400) == \
        history.query("vpg-b", RPO, T0, T0 + 3 * 86400)


def test_saves_are_rate_bounded_and_only_when_something_changed(tmp_path):
    history = MetricHistory(tmp_path / "m.state", save_interval=3600)
    history.record("vpg", RPO, 1.0, now=T0)
    assert not history.maybe_save()  # the interval has not passed
    history.save_interval = 0
    assert history.maybe_save()
    assert not history.maybe_save()  # nothing new
    history.record("vpg", RPO, 2.0, now=T0 + 1)
    assert history.maybe_save()


def test_a_damaged_snapshot_is_set_aside_with_a_clear_error_and_history_starts_fresh(
        tmp_path, caplog):
    path = tmp_path / "metrics.state"
    history = MetricHistory(path)
    history.record("vpg", RPO, 1.0, now=T0)
    history.save()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError):
        MetricHistory.load(path)
    with caplog.at_level(logging.ERROR):
        fresh = MetricHistory.open(path)
    assert fresh.vpgs == [] and fresh.load_error is not None
    assert "damaged" in caplog.text and str(path) in caplog.text
    assert not path.exists() and (tmp_path / "metrics.state.damaged").exists()
    fresh.record("vpg", RPO, 2.0, now=T0)
    fresh.close()
    assert MetricHistory.open(path).query("vpg", RPO, T0, T0).avg == [2.0]


def test_a_snapshot_whose_checksum_holds_but_rings_do_not_is_refused(tmp_path):
    from zcore.fsutil import read_state, write_state
    from zcore.site import metrics
    path = tmp_path / "metrics.state"
    history = MetricHistory(path)
    history.record("vpg", RPO, 1.0, now=T0)
    history.save()
    meta = read_state(path, metrics.STATE_FORMAT, metrics.STATE_VERSION)
    meta["vpgs"]["vpg"][0]["slots"] = 5  # columns hold one slot
    write_state(path, metrics.STATE_FORMAT, metrics.STATE_VERSION, meta)
    with pytest.raises(CorruptRecordError, match="malformed"):
        MetricHistory.load(path)
    write_state(path, metrics.STATE_FORMAT, 99, meta)
    with pytest.raises(FormatVersionError):
        MetricHistory.load(path)
    assert MetricHistory.open(path).load_error is not None


def test_unknown_series_and_backward_ranges_are_refused():
    history = MetricHistory()
    with pytest.raises(ConfigError, match="rpo_seconds"):
        history.record("vpg", "iops", 1.0, now=T0)
    with pytest.raises(ConfigError, match="before it starts"):
        history.query("vpg", RPO, T0, T0 - 1)
    assert history.query("nobody", RPO, T0, T0 + 1).times == []
    with pytest.raises(ConfigError):
        MetricHistory(tiers=(Tier(60, 10), Tier(5, 10)))
    history.record("vpg", RPO, float("nan"), now=T0)  # unknown figure: no point
    assert history.query("vpg", RPO, T0, T0 + 1).times == []
    assert json.dumps(history.snapshot())  # JSON-serializable as the state file needs
