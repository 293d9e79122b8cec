"""The benchmark harness (fastalign.bench): timing options, ratios, the no-sync timing mode and the
GPU window's case lists, on CPU. Timings themselves are not asserted (they live in the benchmarks)."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.bench.core import BenchCase, BenchResult, add_ratios, measure, time_call, with_config


def test_with_config_sets_and_restores_even_on_error():
    seen = []

    def fn():
        seen.append(fastalign.get_config().fp32_logits)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with_config(fn, fp32_logits=False)()
    assert seen == [False]
    assert fastalign.get_config().fp32_logits
    with pytest.raises(TypeError):
        with_config(fn, no_such_setting=1)


def test_time_call_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be"):
        time_call(lambda: None, torch.device("cpu"), method="fast")


def _case(kind, checks=False, record=None):
    def make():
        def run():
            if record is not None:
                record.append(fastalign.get_config())
            return torch.ones(3)

        return run

    return BenchCase(
        "s", "op", "shape", f"{kind}{'+checks' if checks else ''}", kind, make, checks=checks, essential_bytes=0
    )


def test_fastalign_rows_are_timed_without_host_syncs_unless_asked():
    seen_plain, seen_checks, seen_peer = [], [], []
    cpu = torch.device("cpu")
    measure(_case("fastalign", record=seen_plain), cpu, budget_s=0.0)
    measure(_case("fastalign", checks=True, record=seen_checks), cpu, budget_s=0.0)
    measure(_case("peer", record=seen_peer), cpu, budget_s=0.0)
    assert seen_plain and all(not c.index_checks and not c.compact_ignored for c in seen_plain)
    assert seen_checks and all(c.index_checks and c.compact_ignored for c in seen_checks)
    assert seen_peer and all(c.index_checks for c in seen_peer)  # peers: untouched defaults
    assert fastalign.get_config().index_checks  # restored after the timed loop


def test_ratios_against_baseline_floor_and_peers():
    def res(impl, kind, ms, peak, extra=None):
        return BenchResult("s", "op", "shape", impl, kind, ms, peak, extra_mb=extra)

    rows = [
        res("ref", "baseline", 10.0, 100.0),
        res("ours", "fastalign", 4.0, 10.0, extra=1.0),
        res("gemms", "floor", 3.2, 5.0),
        res("peer", "peer", 8.0, 50.0),
    ]
    add_ratios(rows)
    ref, ours, floor, peer = rows
    assert ours.speedup_vs_baseline == pytest.approx(2.5)
    assert ours.memory_vs_baseline == pytest.approx(0.1)
    assert ours.extra_vs_baseline == pytest.approx(0.01)
    assert ours.vs_floor == pytest.approx(1.25)
    assert ours.vs_peers == {"peer": pytest.approx(2.0)}
    assert floor.vs_floor is None and peer.vs_peers == {}


def test_window_case_lists_have_a_baseline_per_group():
    from fastalign.bench.window import bench_groups

    groups = bench_groups(torch.device("cpu"), dry=True)
    assert [g for g, _ in groups][:2] == ["logprobs_from_logits", "linear_logprobs (Qwen2.5-7B head)"]
    for _, cases in groups:
        by_group: dict = {}
        for c in cases:
            by_group.setdefault(c.group, []).append(c.kind)
        for kinds in by_group.values():
            assert kinds.count("baseline") == 1 and "fastalign" in kinds
