"""Launch geometry of kernels/layout.py: chunk plans within the grid limits, the one
contiguous retry, and the cached weighted-sum tables."""
import pytest
import torch

from fastsoup.kernels import layout


def _layout(batch, numel):
    return layout.row_layout([torch.empty(batch, numel)])


@pytest.mark.parametrize("chunk", [None, 1024])
def test_row_chunks_keep_grid_y_within_the_limit(chunk):
    # 2^27 elements per row: a 1024-element chunk override would need 131072 programs
    # along y (limit 65535); the planner enlarges the chunk instead.
    lay = layout.RowLayout(2, 2 ** 27, (1, 1, 2 ** 27), ((2 ** 27, 0, 0, 1),), True)
    c, n = layout.row_chunks(lay, torch.device("cpu"), 1024, chunk)
    assert n <= layout.MAX_GRID_Y and c % 1024 == 0 and c * n >= 2 ** 27


def test_row_chunks_honour_a_valid_override_and_refuse_a_bad_one():
    lay = _layout(3, 5000)
    assert layout.row_chunks(lay, torch.device("cpu"), 1024, 2048) == (2048, 3)
    with pytest.raises(ValueError, match="multiple of 1024"):
        layout.row_chunks(lay, torch.device("cpu"), 1024, 1000)


def test_launch_rows_retries_on_contiguous_copies():
    base = torch.arange(2 * 4 * 6 * 8 * 10, dtype=torch.float32).view(2, 4, 6, 8, 10)
    x = base[:, ::2, ::2, ::2, ::2]   # four inner dims that cannot merge
    assert layout.row_layout([x]) is None
    out = torch.empty_like(x)
    seen = []

    def launch(ins, outs, lay):
        seen.append((ins[0].is_contiguous(), lay is not None))
        outs[0].copy_(ins[0] * 2)
        return "done"

    assert layout.launch_rows([x], [out], launch) == "done"
    assert seen == [(True, True)]
    torch.testing.assert_close(out, x * 2)


def test_weighted_sum_tables_are_cached_by_address_and_size():
    layout._TABLES.clear()
    outs = [torch.empty(n) for n in (5, 2048, 1)]
    ins = [[torch.empty(n) for n in (5, 2048, 1)] for _ in range(2)]
    first = layout.weighted_sum_tables(outs, ins, 1024)
    assert layout.weighted_sum_tables(outs, ins, 1024) is first
    ptrs, numel, bt, bs = first
    assert ptrs[1].tolist() == [outs[1].data_ptr(), ins[0][1].data_ptr(), ins[1][1].data_ptr()]
    assert bt.tolist() == [0, 1, 1, 2] and bs.tolist() == [0, 0, 1024, 0]
    other = [torch.empty(n) for n in (5, 2048, 1)]
    assert layout.weighted_sum_tables(other, ins, 1024) is not first
