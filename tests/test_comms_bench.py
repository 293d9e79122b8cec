"""The comms benchmark (fastalign/bench/suites/comms.py): its per-token byte counts against sums done
here from the collectives' definitions, and its report. That the formulas equal the collectives the
code actually calls is asserted on spawned gloo groups in tests/test_vocab_parallel.py (``_check_comms``)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from fastalign.bench.core import discover_suites
from fastalign.bench.suites import comms


def test_tp_head_bytes_per_token():
    # Qwen2.5-7B, D = 3584, bf16 hidden, fp32 statistics, P = 4
    D, P = 3584, 4
    got = comms.per_token(comms.tp_head_collectives(10, D, entropy=False, hidden_bytes=2), 10, P)
    # forward: max of lse (1 fp32) + sum of (sum-exp, target logit) (2 fp32); backward: dH, D bf16
    assert got["fwd"] == 4 + 8
    assert got["bwd"] == 2 * 3584
    ring = 2 * (P - 1) / P  # an all-reduce sends 2 (P - 1) / P of its tensor per rank
    assert got["wire_total"] == pytest.approx(ring * (12 + 7168))
    with_entropy = comms.per_token(comms.tp_head_collectives(1, D, entropy=True, hidden_bytes=2), 1, P)
    assert with_entropy["fwd"] == 4 + 12


def test_gather_bytes_per_token():
    # Llama-3.1-8B, V = 128256, D = 4096, P = 8 (128256 / 8 = 16032 columns each), bf16 logits
    got = comms.per_token(comms.gather_collectives(3, 128256, 4096, 8, logit_bytes=2, hidden_bytes=2), 3, 8)
    assert got["fwd"] == 16032 * 2
    assert got["wire_fwd"] == 7 * 16032 * 2  # each rank sends its part to the 7 others
    assert got["bwd"] == 4096 * 2
    # an uneven split is padded: all_gather takes equal parts (ceil(10 / 3) = 4 columns)
    assert comms.gather_collectives(1, 10, 2, 3, logit_bytes=4, hidden_bytes=4)[0].nbytes == 16


def test_analytic_table_and_report(tmp_path):
    rows = comms.analytic_table()
    assert {(r["head"], r["P"]) for r in rows} == {(h, p) for h in comms.HEADS for p in comms.WORLDS}
    qwen2 = next(r for r in rows if r["head"] == "Qwen2.5-7B" and r["P"] == 2)
    # fwd: gather sends 152064 / 2 bf16 logits per token, the TP head 2 (P - 1) / P * 12 bytes
    assert qwen2["fwd_ratio"] == pytest.approx(76032 * 2 / 12)
    assert qwen2["ratio"] == pytest.approx((76032 * 2 + 3584 * 2) / (12 + 3584 * 2))
    assert all(r["ratio"] > 10 for r in rows)
    assert comms.main(["--no-measure", "--out", str(tmp_path)]) == 0
    assert "Qwen2.5-7B (152064, 3584)" in (tmp_path / "comms.md").read_text()
    assert len(json.loads((tmp_path / "comms.json").read_text())["rows"]) == len(rows)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "comms.png").stat().st_size > 0


def test_counter_restores_the_collectives():
    before = dist.all_reduce
    with comms.CollectiveCounter():
        assert dist.all_reduce is not before
    assert dist.all_reduce is before


def test_default_bench_leaves_comms_out():
    """Bytes, not timings: ``fastalign bench`` runs modules that define ``cases``; comms defines none."""
    assert "comms" not in discover_suites()
