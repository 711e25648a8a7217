"""The analytic FLOPs model reproduces the worked numbers of docs/methods.md §6.2."""

import pytest

from vlmprune.flops import prefill_macs, reduction

D7, M7, L7 = 4096, 11008, 32
D13, M13, L13 = 5120, 13824, 40


@pytest.mark.parametrize("kept,want", [(192, 0.673), (128, 0.783), (64, 0.892), (32, 0.946)])
def test_llava15_7b_reductions(kept, want):
    full = prefill_macs(576, D7, M7, L7)
    assert reduction(prefill_macs(kept, D7, M7, L7), full) == pytest.approx(want, abs=5e-4)


def test_baseline_macs_and_fastv_sanity():
    assert prefill_macs(576, D7, M7, L7) / 1e12 == pytest.approx(2.99, abs=0.01)
    assert prefill_macs(576, D7, M7, L7, ffn="3ndm") / 1e12 == pytest.approx(3.82, abs=0.01)
    n = 576 + 35
    full = prefill_macs(n, D13, M13, L13)
    fastv = prefill_macs(n, D13, M13, L13, drop_after_layer=2, dropped=288)
    assert reduction(fastv, full) == pytest.approx(0.454, abs=5e-4)
    assert reduction(prefill_macs(64 + 35, D7, M7, L7), prefill_macs(576 + 35, D7, M7, L7)) == pytest.approx(
        0.842, abs=5e-4
    )


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="invalid token counts"):
        prefill_macs(10, D7, M7, L7, drop_after_layer=2, dropped=11)
    with pytest.raises(ValueError, match="ffn must be"):
        prefill_macs(10, D7, M7, L7, ffn="4ndm")
