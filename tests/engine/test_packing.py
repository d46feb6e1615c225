"""Bit packing against the hand-checked words of vptq-format.md §2.3 and §7."""

import pytest
import torch

from engine.formats.packing import (
    pack_indices,
    split_main_residual,
    unpack_indices,
    words_per_row,
)


def u32(words):
    return [w & 0xFFFFFFFF for w in words.tolist()]


@pytest.mark.parametrize(
    ("b1", "b2", "i1", "i2", "expected"),
    [
        (3, 2, [1, 2, 3, 4, 5, 6, 7, 0], [3, 2, 1, 0, 3, 2, 1, 0], [0xEDD22E59, 0x00000003]),
        (
            16,
            8,
            [0x1234, 0xBEEF, 0x0001, 0xFFFF],
            [0xAB, 0x01, 0xFF, 0x00],
            [0xEFAB1234, 0x000101BE, 0x00FFFFFF],
        ),
        (16, 0, [0x1234, 0xBEEF, 0x0001], None, [0xBEEF1234, 0x00000001]),
        (12, 0, [0xABC, 0x123, 0xFFF], None, [0xFF123ABC, 0x0000000F]),
    ],
)
def test_hand_checked_words(b1, b2, i1, i2, expected):
    m = torch.tensor(i1)
    if i2 is not None:
        m = m | (torch.tensor(i2) << b1)
    words = pack_indices(m, b1 + b2)
    assert words.dtype == torch.int32
    assert u32(words) == expected
    assert unpack_indices(words, b1 + b2, len(i1)).tolist() == m.tolist()


def test_first_example_as_int32():
    m = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]) | (torch.tensor([3, 2, 1, 0, 3, 2, 1, 0]) << 3)
    assert pack_indices(m, 5).tolist() == [-304992679, 3]


def test_formula_layer_a_first_words():
    """§7.2: i1 = (37n + 11g) mod 256, i2 = (5n + 3g) mod 16, row 0 begins with these words."""
    g = torch.arange(96)
    m = ((11 * g) % 256) | (((3 * g) % 16) << 8)
    words = pack_indices(m, 12)
    assert words.shape == (36,)
    assert u32(words[:4]) == [0x1630B000, 0x7C2C9216, 0x54D242F3, 0x6EB63858]


@pytest.mark.parametrize(
    ("b1", "b2"),
    [
        (16, 8),
        (16, 0),
        (12, 0),
        (16, 12),
        (16, 16),
        (10, 9),
        (15, 0),
        (8, 8),
        (1, 0),
        (9, 0),
        (11, 0),
        (13, 0),
        (14, 0),
        (16, 13),
        (16, 14),
        (4, 3),
    ],
)
@pytest.mark.parametrize("count", [1, 33, 37, 100])
def test_round_trip_and_bit_rule(b1, b2, count):
    gen = torch.Generator().manual_seed(b1 * 100 + b2 + count)
    bits = b1 + b2
    m = torch.randint(0, 1 << bits, (3, count), generator=gen, dtype=torch.int64)
    words = pack_indices(m, bits)
    assert words.shape == (3, words_per_row(count, bits))
    assert torch.equal(unpack_indices(words, bits, count), m)
    # Independent decode straight from the word/offset rule, in plain Python integers.
    row = [*u32(words[1]), 0]
    for g in range(count):
        s = g * bits
        w, o = s >> 5, s & 31
        value = row[w] >> o
        if o + bits > 32:
            value |= row[w + 1] << (32 - o)
        assert value & ((1 << bits) - 1) == m[1, g].item()


def test_rows_are_padded_independently():
    m = torch.tensor([[1, 1, 1], [2, 2, 2]])
    words = pack_indices(m, 5)  # 15 bits per row: one word each, not shared between rows
    assert words.shape == (2, 1)
    assert u32(words.flatten()) == [1 | 1 << 5 | 1 << 10, 2 | 2 << 5 | 2 << 10]


def test_out_of_range_index_refused():
    for value in (16, -1):
        with pytest.raises(ValueError, match="index out of range for 4 bits"):
            pack_indices(torch.tensor([value]), 4)


def test_rows_too_short_for_their_elements_refused():
    """Ten 7-bit elements need 70 bits, three words a row: two are refused, naming both."""
    with pytest.raises(ValueError, match="2 words per row hold fewer than 10x7 bits"):
        unpack_indices(torch.zeros(4, 2, dtype=torch.int32), 7, 10)
    assert unpack_indices(torch.zeros(4, 3, dtype=torch.int32), 7, 10).shape == (4, 10)


def test_elements_split_into_main_and_residual_indices():
    """An element is main | residual << b1: the hand-checked first example's elements (b1 3,
    b2 2) split back into its two lists, odd residuals among them; no residual: None."""
    main, res = [1, 2, 3, 4, 5, 6, 7, 0], [3, 2, 1, 0, 3, 2, 1, 0]
    values = torch.tensor(main) | (torch.tensor(res) << 3)
    got_main, got_res = split_main_residual(values, 3, 2)
    assert got_main.tolist() == main and got_res.tolist() == res
    only, none = split_main_residual(values, 5, 0)
    assert only.tolist() == values.tolist() and none is None


@pytest.mark.parametrize("bits", [0, 33])
def test_bit_widths_outside_1_to_32_are_refused(bits):
    with pytest.raises(ValueError, match=f"bit width {bits} outside 1..32"):
        pack_indices(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match=f"bit width {bits} outside 1..32"):
        unpack_indices(torch.tensor([0], dtype=torch.int32), bits, 1)
