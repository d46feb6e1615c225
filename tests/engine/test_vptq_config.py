"""A VPTQ quantization_config's layer specs (engine/formats/vptq.py) against vptq-format.md §1-2,
field by field: what is accepted at each rule's edge, what is refused and how the message names
it, and the tensors a spec expects."""

import pytest

from engine.formats.vptq import FormatError, layer_table, resolve_layer, spec_from_dict

WHERE = "config.json: layer model.layers.0.mlp.up_proj"


def layer(**over):
    """A v8-k256 layer of 64 inputs and 32 outputs, no outliers, no residual."""
    d = {"in_features": 64, "out_features": 32, "vector_lens": [-1, 8],
         "num_centroids": [-1, 256], "num_res_centroids": [-1, -1], "group_num": 1,
         "group_size": 64, "outlier_size": 0, "enable_norm": True, "enable_perm": True}  # fmt: skip
    return {**d, **over}


def refused(d, message):
    with pytest.raises(FormatError, match=message) as err:
        spec_from_dict(d, WHERE)
    assert str(err.value).startswith(WHERE)


def test_the_four_bit_community_scheme_takes_all_32_index_bits():
    """v8-k65536-65536: 16 main + 16 residual bits an element, one int32 word each."""
    s = spec_from_dict(layer(num_centroids=[-1, 65536], num_res_centroids=[-1, 65536]), WHERE)
    assert (s.main_bits, s.res_bits, s.index_bits) == (16, 16, 32)
    assert s.bits_per_weight == 4.0 and s.words == 64
    assert spec_from_dict(layer(), WHERE).bits_per_weight == 1.0  # 8 bits over 8 weights


def test_vector_lengths_1_to_64():
    for v in (1, 64):
        assert spec_from_dict(layer(vector_lens=[-1, v]), WHERE).vector_len == v
    for v in (0, 65):
        refused(layer(vector_lens=[-1, v]), f"vector length {v} outside 1..64")


def test_codebook_sizes_are_powers_of_two_from_2_to_65536():
    assert spec_from_dict(layer(num_centroids=[-1, 2]), WHERE).main_bits == 1
    for k in (1, 131072, 300):
        refused(layer(num_centroids=[-1, k]), f"'num_centroids' = {k} is not a power of two")
    refused(layer(num_res_centroids=[-1, 3]), "'num_res_centroids' = 3 is not a power of two")


def test_outliers_only_with_an_outlier_vector_length_above_1_and_a_codebook():
    """§2: outliers are on iff v0 > 1 and k0 > 0; then the first outlier_size columns are
    theirs and the groups share the rest (group_size defaults to that share)."""
    on = spec_from_dict(
        layer(vector_lens=[4, 8], num_centroids=[16, 256], outlier_size=16, group_num=2,
              group_size=24),
        WHERE,
    )  # fmt: skip
    assert on.has_outliers and (on.outlier_size, on.outlier_vector_len) == (16, 4)
    assert on.num_outlier_indices == 8 and on.outlier_centroids == 16
    shapes = on.tensor_shapes()
    assert shapes["outlier_centroids.weight"] == ((1, 64), "float")
    assert shapes["outlier_indices"] == ((1, 8, 16), "int16")
    two = layer(vector_lens=[2, 8], num_centroids=[16, 256], outlier_size=16, group_size=48)
    assert spec_from_dict(two, WHERE).has_outliers
    for v0, k0 in ((1, 16), (4, -1), (4, 0), (-1, -1)):  # an outlier_size then counts for nothing
        d = layer(vector_lens=[v0, 8], num_centroids=[k0, 256], outlier_size=16)
        off = spec_from_dict(d, WHERE)
        assert not off.has_outliers and (off.outlier_size, off.group_size) == (0, 64)
        assert "outlier_indices" not in off.tensor_shapes()
    derived = layer(vector_lens=[4, 8], num_centroids=[16, 256], outlier_size=16, group_num=2)
    del derived["group_size"]
    assert spec_from_dict(derived, WHERE).group_size == 24  # (64 - 16) / 2
    no_groups = layer()
    del no_groups["group_num"], no_groups["group_size"]
    one = spec_from_dict(no_groups, WHERE)
    assert (one.group_num, one.group_size) == (1, 64)
    refused(layer(group_num=2, group_size=24), r"outlier_size 0 \+ group_num 2 x group_size 24")
    # on, their codebook's size is checked as the main one's, and their columns must be given
    refused(layer(vector_lens=[4, 8], num_centroids=[1, 256], outlier_size=16, group_size=48),
            r"'num_centroids\[0\] \(outliers\)' = 1 is not a power of two")  # fmt: skip
    unsized = layer(vector_lens=[4, 8], num_centroids=[16, 256])
    del unsized["outlier_size"]
    refused(unsized, r"outliers are on \(vector_lens\[0\] = 4, num_centroids\[0\] = 16\) but "
                     "'outlier_size', their number of columns, is missing: the checkpoint's "
                     "config is incomplete; download it again or ask its publisher")  # fmt: skip


def test_pairs_and_bare_values():
    """A bare number stands for the main value (no outliers); anything but a pair is refused."""
    s = spec_from_dict(layer(vector_lens=8, num_centroids=256), WHERE)
    assert (s.vector_len, s.num_centroids, s.has_outliers) == (8, 256, False)
    refused(layer(vector_lens=[-1, 8, 2]), "'vector_lens' must be a pair")


def test_the_tensors_a_layer_stores():
    s = spec_from_dict(
        layer(num_res_centroids=[-1, 16], group_num=2, group_size=32, bias=True), WHERE
    )
    assert s.tensor_shapes() == {
        "centroids.weight": ((2, 256 * 8), "float"),
        "indices": ((2, 4, 12), "int32"),  # 4 vector-rows, 32 elements of 12 bits: 12 words
        "res_centroids.weight": ((2, 16 * 8), "float"),
        "perm": ((64,), "int16"),
        "weight_scale": ((64,), "float"),
        "weight_bias": ((64,), "float"),
        "bias": ((32,), "float"),
    }
    plain = spec_from_dict(layer(is_indice_packed=False, enable_norm=False), WHERE)
    assert plain.tensor_shapes() == {
        "centroids.weight": ((1, 2048), "float"),
        "indices": ((1, 4, 64), "int16"),
        "perm": ((64,), "int64"),
    }
    refused(layer(is_indice_packed=False, num_res_centroids=[-1, 16]), "unpacked indices with")


def test_the_layer_table_and_which_entry_a_module_takes():
    per = {"model.layers.0.mlp.up_proj": layer(num_centroids=[-1, 16])}
    shared = {"up_proj": layer(num_centroids=[-1, 64]), "down_proj": layer()}
    cfg = {"quantization_config": {"quant_method": "vptq", "config_for_layers": per,
                                   "shared_layer_config": shared}}  # fmt: skip
    table = layer_table(cfg)
    assert table == (per, shared)
    take = lambda name: resolve_layer(name, table, "config.json")  # noqa: E731
    assert take("model.layers.0.mlp.up_proj").num_centroids == 16  # its own entry first
    assert take("model.layers.1.mlp.up_proj").num_centroids == 64  # then by its last name
    assert take("model.layers.1.mlp.down_proj").num_centroids == 256
    assert take("model.layers.1.self_attn.q_proj") is None  # a plain linear
    assert layer_table({"quant_config": per}) == (per, {})  # vptq <= 0.0.3
    for not_vptq in ({"quant_config": {}}, {"quantization_config": {"quant_method": "gptq"}}, {}):
        assert layer_table(not_vptq) is None
