"""Block summaries: exact against brute force for real mask patterns; broadcast; cache semantics."""

import pytest
import torch

from flashfuse import mask_patterns as mp
from flashfuse.kernels import block_sparse as bs

BM, BN = 16, 32


def _brute(keep4: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    b, h, m, n = keep4.shape
    bm = bm if m > 1 else 1
    mb, nb = -(-m // bm), -(-n // bn)
    out = torch.empty(b, h, mb, nb, dtype=torch.int8)
    for i in range(mb):
        for j in range(nb):
            tile = keep4[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            kept = tile.flatten(2).sum(-1)
            out[:, :, i, j] = torch.where(kept == 0, bs.EMPTY, torch.where(kept == tile[0, 0].numel(), bs.FULL, bs.PARTIAL))
    return out


PATTERNS = {
    "causal": lambda: mp.causal(100, 100),
    "sliding_window": lambda: mp.sliding_window(130, 130, window=40),
    "document": lambda: mp.document([30, 50, 1, 49]),
    "prefix_lm": lambda: mp.prefix_lm(97, 97, prefix=33),
    "dilated": lambda: mp.dilated(80, 80, stride=3),
    "random_blocks": lambda: mp.random_blocks(100, 129, BM, BN, density=0.3, seed=1),
    "cross_attention": lambda: torch.rand(33, 200) > 0.1,
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_summary_matches_brute_force(name):
    keep = PATTERNS[name]()[None, None]
    got = bs.summarize(keep, BM, BN)
    torch.testing.assert_close(got, _brute(keep, BM, BN), rtol=0, atol=0)


def test_padding_mask_keeps_its_broadcast():
    keep = mp.padding([5, 64, 33], 70)  # [B, 1, 1, N]
    got = bs.summarize(keep, BM, BN)
    assert got.shape == (3, 1, 1, 3)
    torch.testing.assert_close(got, _brute(keep, BM, BN), rtol=0, atol=0)


def test_bias_summary_empty_and_full():
    bias = torch.zeros(1, 2, 40, 70)
    bias[:, :, :, 64:] = float("-inf")  # last key block all -inf (EMPTY)
    bias[:, 1, :5, :5] = 0.5            # one PARTIAL tile in head 1
    got = bs.summarize(bias, BM, BN)
    assert got.shape == (1, 2, 3, 3)
    assert (got[..., 2] == bs.EMPTY).all()
    assert got[0, 0, :, :2].eq(bs.FULL).all() and got[0, 1, 0, 0] == bs.PARTIAL


def test_lists_walk_only_nonempty_blocks():
    keep = mp.sliding_window(128, 128, window=32)[None, None]
    lists = bs.lists_for(None, keep, 32, 32)
    summary = bs.summarize(keep, 32, 32)
    for i in range(4):
        want = [j for j in range(4) if summary[0, 0, i, j] != bs.EMPTY]
        assert lists.kv_index[0, 0, i, : lists.kv_count[0, 0, i]].tolist() == want
        assert lists.kv_full[0, 0, i, : len(want)].tolist() == [int(summary[0, 0, i, j] == bs.FULL) for j in want]
        want_q = [r for r in range(4) if summary[0, 0, r, i] != bs.EMPTY]
        assert lists.q_index[0, 0, i, : lists.q_count[0, 0, i]].tolist() == want_q
    assert 0 < lists.density < 1


def test_cache_hits_while_unchanged_and_misses_after_change():
    bs.cache.clear()
    keep = mp.causal(64, 64)[None, None]
    bs.cache.get(keep, BM, BN)
    bs.cache.get(keep, BM, BN)
    assert (bs.cache.hits, bs.cache.misses) == (1, 1)
    keep[..., 0, 1] = True  # in place: the version counter moves
    s = bs.cache.get(keep, BM, BN)
    assert bs.cache.misses == 2 and s[0, 0, 0, 0] == bs.PARTIAL
    other = keep.clone()  # an equal tensor is a different object: summarized anew
    bs.cache.get(other, BM, BN)
    assert bs.cache.misses == 3


def test_combine_mask_and_bias():
    mask = torch.ones(1, 1, 32, 64, dtype=torch.bool)
    mask[..., 32:] = False
    bias = torch.zeros(1, 4, 32, 64)
    bias[:, 0, 0, 0] = 1.0
    combined = bs.combine(bs.summarize(bias, 32, 32), bs.summarize(mask, 32, 32))
    assert combined.shape == (1, 4, 1, 2)
    assert combined[0, 0, 0].tolist() == [bs.PARTIAL, bs.EMPTY]
    assert combined[0, 1, 0].tolist() == [bs.FULL, bs.EMPTY]


def test_from_layout():
    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    lists = bs.from_layout(layout, 64, 64)
    assert lists.kv_count.tolist() == [[[1, 2]]]
    assert lists.kv_full[0, 0].tolist() == [[1, 0], [1, 1]]
