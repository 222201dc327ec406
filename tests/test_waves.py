"""The split-K waves model (kernels/dispatch.waves_split) that both kernels' defaults use when no measured table
entry exists: split K when a wave of CTAs would leave SMs idle, not when the grid already fills the GPU."""

import pytest

from fp6llm.kernels.dispatch import heuristic_config, waves_split

SMS = 132


def test_an_underfilled_wave_is_split():
    # 64 tiles, one CTA per SM: half the SMs idle unsplit; two splits fill one wave and halve each CTA's K
    assert waves_split(64, 64, SMS, resident=1, partial_cost=1.0, sum_cost=1.0) == 2


def test_a_full_grid_is_not_split():
    # 264 tiles = exactly two waves: splitting only adds partials
    assert waves_split(264, 64, SMS, resident=1, partial_cost=1.0, sum_cost=1.0) == 1


@pytest.mark.parametrize("tiles, k_blocks", [(1, 8), (1, 64), (3, 400), (40, 40)])
def test_every_cta_keeps_its_minimum_k_blocks(tiles, k_blocks):
    split = waves_split(tiles, k_blocks, SMS, resident=6, partial_cost=0.0, min_blocks=4)
    assert split >= 1 and -(-k_blocks // split) >= min(4, k_blocks)
    if tiles * 4 < SMS * 6 and k_blocks >= 8:
        assert split > 1  # free SMs and K to share: the model splits


def test_cost_of_summing_partials_limits_the_split():
    cheap = waves_split(10, 256, SMS, resident=1, partial_cost=0.0)
    dear = waves_split(10, 256, SMS, resident=1, partial_cost=0.0, sum_cost=4.0)
    assert dear < cheap


def test_mid_m_heuristic_fills_the_sms():
    """M = 128 on an 8192 x 8192 weight: 64 tiles of 128 rows (0.49x cuBLAS unsplit on an H200): split in two;
    a weight with 120 tiles (13b-qkv) is not split, and neither is M = 512 of 8192 x 8192 (128 tiles of 256 x 128)."""
    assert heuristic_config(128, 8192, 8192, SMS).split_k == 2
    assert heuristic_config(128, 15360, 5120, SMS).split_k == 1
    assert heuristic_config(512, 8192, 8192, SMS).split_k == 1
