"""Deep Compression's weight sharing, compact coding and int8 (toolchain/methods/quantize)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from converters import from_module
from toolchain.errors import ModelFormatError, RecipeError
from toolchain.methods.quantize import coding
from toolchain.methods.quantize.kmeans import init_centroids, kmeans_1d
from toolchain.methods.quantize.layers import SharedConv2d, SharedLinear, int8_from_dense, shared_from_dense
from toolchain.methods.quantize.onnx import export_quantized, import_quantized, shared_groups


def _pruned_linear(i=40, o=12, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g) * 0.1)
        lin.weight.mul_(torch.rand(o, i, generator=g) < density)
    return lin


def _run(model_bytes, x):
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------- k-means
def test_kmeans_linear_init_is_deterministic_and_spans_range():
    v = np.random.default_rng(3).normal(size=2000)
    c0 = init_centroids(v, 8, "linear")
    assert c0[0] == v.min() and c0[-1] == v.max() and np.allclose(np.diff(c0), np.diff(c0)[0])
    a = kmeans_1d(v, 16, "linear", seed=1)
    b = kmeans_1d(v, 16, "linear", seed=2)  # linear init does not use the seed
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    r1, r2 = kmeans_1d(v, 16, "random", seed=5), kmeans_1d(v, 16, "random", seed=5)
    assert np.array_equal(r1[0], r2[0])
    d = kmeans_1d(v, 16, "density")
    for c, codes in (a, r1, d):  # every value sits with its nearest centroid, centroids are members' means
        assert np.array_equal(codes, np.argmin(np.abs(v[:, None] - c[None]), axis=1))
        for j in np.unique(codes):
            assert np.isclose(c[j], v[codes == j].mean())


def test_kmeans_matches_scipy_kmeans2_from_the_same_init():
    from scipy.cluster.vq import kmeans2

    v = np.random.default_rng(0).normal(size=500)
    init = init_centroids(v, 8, "linear")
    ours, codes = kmeans_1d(v, 8, "linear", iterations=300)
    theirs, lab = kmeans2(v[:, None], init[:, None].copy(), iter=300, minit="matrix")
    assert np.allclose(np.sort(ours), np.sort(theirs[:, 0]), atol=1e-9)


# ----------------------------------------------------------------------------- shared layers
def test_shared_value_gradient_is_the_sum_of_its_weights_gradients():
    lin = _pruned_linear()
    sh = shared_from_dense(lin, bits=3)
    x = torch.randn(5, 40)
    sh(x).pow(2).sum().backward()
    # the same loss through a free dense weight equal to codebook[codes] * mask
    w = (sh.codebook[sh.codes] * sh.mask).detach().requires_grad_(True)
    torch.nn.functional.linear(x, w, sh.bias.detach()).pow(2).sum().backward()
    expect = torch.zeros(8).index_add_(0, sh.codes[sh.mask], w.grad[sh.mask])
    assert torch.allclose(sh.codebook.grad, expect, atol=1e-5)
    assert torch.count_nonzero(expect) > 0


def test_pruned_weights_stay_zero_through_quantized_retraining():
    lin = _pruned_linear()
    zero = lin.weight == 0
    sh = shared_from_dense(lin, bits=2)
    opt = torch.optim.SGD(sh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = sh.codebook.detach().clone()
    for _ in range(20):
        opt.zero_grad()
        sh(torch.randn(8, 40)).sum().backward()
        opt.step()
    assert not torch.equal(before, sh.codebook.detach())
    assert torch.all(sh.weight[zero] == 0) and torch.all(sh.weight[~zero] != 0)
    assert len(torch.unique(sh.weight[~zero])) <= 4


def test_bad_bits_and_too_few_weights_are_errors():
    with pytest.raises(ValueError, match="bits"):
        SharedLinear(4, 4, bits=9)
    lin = _pruned_linear(8, 2, density=0.2)
    with pytest.raises(ValueError, match="remaining weights"):
        shared_from_dense(lin, bits=4)


# ----------------------------------------------------------------------------- coding
@pytest.mark.parametrize("width", [1, 2, 3, 5, 8])
def test_delta_coding_with_fillers_round_trips(width):
    rng = np.random.default_rng(width)
    for density in (0.0, 0.001, 0.05, 0.5, 1.0):
        w = rng.normal(size=(30, 70)) * (rng.random((30, 70)) < density)
        w[3:9] = 0  # empty rows: gaps longer than any index width
        codes = rng.integers(0, 16, size=w.shape)
        coded = coding.encode_weight(w, codes, width)
        assert coded.deltas.max(initial=0) < (1 << width)
        pos, c = coding.delta_decode(coded)
        assert np.array_equal(pos, np.flatnonzero(w)) and np.array_equal(c, codes.reshape(-1)[pos])
        if density == 0.001 and width <= 5:
            assert coded.fillers > 0


def test_delta_decode_rejects_corrupted_streams():
    coded = coding.delta_encode(np.array([3, 9]), np.array([1, 2]), 3, 10)
    bad = coding.DeltaCoded(coded.deltas.copy(), coded.codes, 3, 5)
    with pytest.raises(ModelFormatError, match="corrupted index stream"):
        coding.delta_decode(bad)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits):
    v = np.random.default_rng(bits).integers(0, 1 << bits, size=101)
    packed = coding.pack_bits(v, bits)
    assert packed.dtype == np.uint8 and packed.size == (101 * bits + 7) // 8
    assert np.array_equal(coding.unpack_bits(packed, bits, 101), v)


def test_huffman_round_trips_and_beats_fixed_width_on_skewed_data():
    rng = np.random.default_rng(0)
    s = np.minimum(rng.geometric(0.3, size=3000) - 1, 31)
    coded = coding.huffman_encode(s)
    assert np.array_equal(coding.huffman_decode(coded), s)
    assert coded.nbits == coding.huffman_bits(s) < 5 * s.size
    lengths = coded.lengths  # Kraft equality for a full binary code
    assert abs(sum(2.0 ** -n for n in lengths.values()) - 1) < 1e-12
    one = coding.huffman_encode(np.array([7, 7, 7]))
    assert np.array_equal(coding.huffman_decode(one), [7, 7, 7])


def test_delta_decode_error_names_the_last_position():
    bad = coding.DeltaCoded(np.array([1, 1, 5]), np.array([0, 1, 2]), 3, 4)  # positions 0, 1, 6 in 4 entries
    with pytest.raises(ModelFormatError, match="corrupted index stream: position 6 past the weight's 4 entries"):
        coding.delta_decode(bad)


def test_bit_packing_flattens_and_takes_plain_byte_lists():
    v = np.arange(12).reshape(3, 4) % 8
    packed = coding.pack_bits(v, 3)
    assert np.array_equal(packed, coding.pack_bits(v.reshape(-1), 3)) and packed.size == 5
    assert np.array_equal(coding.unpack_bits([int(b) for b in packed], 3, 12), v.reshape(-1))


def test_huffman_single_symbol_and_tie_breaking():
    assert coding.huffman_lengths(np.array([5, 5, 5])) == {5: 1}  # one bit per symbol, not zero or two
    assert coding.huffman_bits(np.array([5, 5, 5])) == 3 and coding.huffman_encode(np.array([5, 5, 5])).nbits == 3
    # ties: a merged node queues after the leaves of the same count (the code with the shortest longest word)
    s = np.repeat(np.arange(7), [1, 1, 1, 1, 2, 2, 4])
    assert coding.huffman_lengths(s) == {0: 3, 1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 2}
    assert coding.huffman_lengths(np.repeat(np.arange(5), [1, 1, 2, 2, 4])) == {0: 3, 1: 3, 2: 2, 3: 2, 4: 2}
    assert np.array_equal(coding.huffman_decode(coding.huffman_encode(s)), s)


def test_huffman_decode_corruption_messages():
    # codes 0 -> "0", 1 -> "10", 2 -> "11": a stream "1" stops inside a code
    cut = coding.HuffmanCoded(np.packbits(np.array([1], np.uint8)), 1, 1, {0: 1, 1: 2, 2: 2})
    with pytest.raises(ModelFormatError, match="^corrupted Huffman stream: ends inside a code$"):
        coding.huffman_decode(cut)
    # a one-symbol code "0": "10" is no code at all
    for bits in ([1], [1, 0]):  # found as soon as the longest code length is read, stream end or not
        bad = coding.HuffmanCoded(np.packbits(np.array(bits, np.uint8)), len(bits), 1, {7: 1})
        with pytest.raises(ModelFormatError, match="^corrupted Huffman stream: no symbol has this code$"):
            coding.huffman_decode(bad)


# ----------------------------------------------------------------------------- ONNX
def _net(seed=0, density=0.25):
    torch.manual_seed(seed)
    seq = nn.Sequential()
    seq.add_module("conv1", nn.Conv2d(1, 4, 3))
    seq.add_module("relu1", nn.ReLU())
    seq.add_module("flat", nn.Flatten())
    seq.add_module("ip1", nn.Linear(4 * 6 * 6, 20))
    seq.add_module("relu2", nn.ReLU())
    seq.add_module("ip2", nn.Linear(20, 5))
    net = from_module(seq, torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        for name, m in net.layers().items():
            m.weight.mul_(torch.rand_like(m.weight) < density)
    return net


def _quantize(net, bits=(2, 5, 3)):
    for (name, layer), b in zip(list(net.layers().items()), bits):
        new = shared_from_dense(layer, b)
        net.replace_layer(name, new)
    return net


@pytest.mark.parametrize("bits,group", [((2, 5, 3), True), ((2, 3, 3), True), ((2, 2, 2), True), ((2, 3, 3), False)])
def test_portable_decoding_in_onnxruntime_equals_the_torch_layer(tmp_path, bits, group):
    net = _quantize(_net(), bits).eval()
    net.layers()["ip1"].bias_bits = 16  # float16 bias: stored rounded, computed rounded
    net.layers()["conv1"].bias_bits = 16
    net.layers()["ip2"].index_bits = 2  # a narrow index: fillers
    x = torch.rand(3, 1, 8, 8)
    model = export_quantized(net, tmp_path / "q.onnx", group=group)
    ours = _run(model.SerializeToString(), x.numpy())
    groups = {id(g) for g in shared_groups(net).values()} if group else net.layers()
    assert sum(n.op_type == "ScatterElements" for n in model.graph.node) == len(groups)
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.allclose(ours, ref, atol=1e-5)
    # no float weight matrix is stored: only codebooks, packed uint8 streams and biases
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(len(t.dims) <= 1 and sum(t.dims) <= 3 * 32 for t in floats)


@pytest.mark.parametrize("bits", [(2, 5, 3), (2, 3, 3), (2, 2, 2), (2, 4, 2)])
def test_portable_file_reimports_as_shared_layers(tmp_path, bits):
    net = _quantize(_net(), bits).eval()
    net.layers()["ip1"].bias_bits = 16
    export_quantized(net, tmp_path / "q.onnx")
    back = import_quantized(tmp_path / "q.onnx")
    layers = back.layers()
    assert isinstance(layers["ip1"], SharedLinear) and isinstance(layers["conv1"], SharedConv2d)
    for name, m in net.layers().items():
        assert torch.equal(layers[name].weight, m.weight.detach())
        assert layers[name].bits == m.bits and layers[name].bias_bits == m.bias_bits
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(back(x), net(x), atol=1e-6)


def test_corrupted_codebook_or_stream_is_a_clear_error(tmp_path):
    from toolchain.methods.quantize.onnx import read_records

    net = _quantize(_net(), (2, 3, 3)).eval()
    model = export_quantized(net)
    recs = list(read_records(model).values())
    big = max(recs, key=lambda r: r["entries"])
    cases = [(big["codebook"], lambda a: a[:-1]), (big["packed"], lambda a: a[:-3]),
             (big["codebook"], lambda a: np.full_like(a, np.nan))] + [(r["packed"], lambda a: a * 0 + 255) for r in recs]
    for target, edit in cases:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if t.name == target:
                t.CopyFrom(onnx.numpy_helper.from_array(edit(onnx.numpy_helper.to_array(t)), t.name))
        with pytest.raises(ModelFormatError) as e:
            import_quantized(m)
        assert "\n" not in str(e.value)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.metadata_props[0].value = m.metadata_props[0].value.replace('"b":', '"b":"x",')
    with pytest.raises(ModelFormatError, match="malformed"):
        import_quantized(m)


def test_int8_qdq_and_dense_form_run_in_stock_onnxruntime(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    net = _net().eval()
    ref_net = _net().eval()
    for name, layer in list(net.layers().items()):
        net.replace_layer(name, int8_from_dense(layer))
    x = torch.rand(4, 1, 8, 8)
    model = export_quantized(net, tmp_path / "i8.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    with torch.no_grad():
        assert np.allclose(_run(model.SerializeToString(), x.numpy()), net(x).numpy(), atol=1e-5)
        assert np.allclose(net(x).numpy(), ref_net(x).numpy(), atol=0.05)
    back = import_quantized(tmp_path / "i8.onnx")  # DequantizeLinear folds at import
    with torch.no_grad():
        assert torch.allclose(back(x), net(x), atol=1e-6)
    # dense form: plain float initializers for onnxruntime.quantization
    big = nn.Sequential()
    big.add_module("flat", nn.Flatten())
    big.add_module("ip1", nn.Linear(64, 256))
    big.add_module("relu", nn.ReLU())
    big.add_module("ip2", nn.Linear(256, 10))
    g = _quantize(from_module(big, torch.zeros(1, 1, 8, 8)), bits=(4, 4)).eval()
    export_quantized(g, tmp_path / "dense.onnx", form="dense")
    dense_model = onnx.load(tmp_path / "dense.onnx")
    assert {n.op_type for n in dense_model.graph.node} <= {"Flatten", "Gemm", "Relu", "MatMul", "Add", "Reshape"}
    quantize_dynamic(str(tmp_path / "dense.onnx"), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    assert (tmp_path / "dyn.onnx").stat().st_size < 0.5 * (tmp_path / "dense.onnx").stat().st_size
    xs = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        ref = g(xs).numpy()
    out = _run((tmp_path / "dyn.onnx").read_bytes(), xs.numpy())
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_int8_layers_keep_bias_absence_and_groups():
    from toolchain.methods.quantize.layers import Int8Conv2d, Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(6, 3, bias=False)
    q = int8_from_dense(lin)
    assert isinstance(q, Int8Linear) and q.bias is None and "bias" not in q.state_dict()
    assert Int8Conv2d(4, 6, 3).groups == 1 and Int8Conv2d(4, 6, 3).weight.shape == (6, 4, 3, 3)  # nn.Conv2d's default
    conv = nn.Conv2d(4, 6, 3, groups=2)
    qc = int8_from_dense(conv)
    assert isinstance(qc, Int8Conv2d) and qc.groups == 2 and qc.weight.shape == (6, 2, 3, 3)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert torch.allclose(qc(x), nn.functional.conv2d(x, qc.weight, qc.bias, groups=2))
        assert torch.allclose(qc(x), conv(x), atol=0.02)


def test_dense_form_keeps_conv_geometry_bias_absence_and_plain_layers():
    from toolchain.methods.quantize.onnx import densify

    torch.manual_seed(0)
    seq = nn.Sequential()
    seq.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1, bias=False))
    seq.add_module("relu1", nn.ReLU())
    seq.add_module("conv2", nn.Conv2d(4, 4, 3, stride=2, groups=2))
    seq.add_module("flat", nn.Flatten())
    seq.add_module("ip1", nn.Linear(36, 10))  # stays a plain layer
    net = from_module(seq, torch.zeros(1, 1, 8, 8))
    net.replace_layer("conv1", shared_from_dense(net.layers()["conv1"], 2))
    net.replace_layer("conv2", int8_from_dense(net.layers()["conv2"]))
    net.eval()
    d = densify(net).eval()
    layers = d.layers()
    assert [type(m) for m in layers.values()] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    c1, c2 = layers["conv1"], layers["conv2"]
    assert c1.bias is None and c1.padding == (1, 1) and c1.kernel_size == (3, 3)
    assert c2.stride == (2, 2) and c2.groups == 2 and c2.padding == (0, 0) and c2.bias is not None
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(d(x), net(x), atol=1e-6)
    assert isinstance(net.layers()["conv1"], SharedConv2d)  # the original is untouched


def test_fast_form_nodes_and_initializers_are_named_after_the_layer():
    from toolchain import kernels
    from toolchain.exporter import export_compressed

    for kind, arrays in (("share", ["codebook", "codes", "deltas", "row_ptr", "bias"]),
                         ("int8", ["values", "deltas", "row_ptr", "scales", "bias"])):
        net = _net(seed=2, density=0.6).eval()
        for name, layer in list(net.layers().items()):
            new = int8_from_dense(layer) if kind == "int8" else shared_from_dense(layer, 2 if name == "conv1" else 4)
            net.replace_layer(name, new)
        model = export_compressed(net, None, form="fast")
        nodes = [n for n in model.graph.node if n.domain == kernels.DOMAIN]
        assert [n.name for n in nodes] == ["ip1", "ip2"]
        for n in nodes:
            assert list(n.input[1:]) == [f"{n.name}.{a}" for a in arrays]
        inits = {t.name for t in model.graph.initializer}
        assert all(i in inits for n in nodes for i in n.input[1:])


def _group_record(fields, width, bits, layers, size, codebook):
    """A decode_group record and its initializers for raw (delta, code) fields."""
    f = width + bits
    v = np.array([d | (c << width) for d, c in fields], np.int64)
    packed = np.packbits(((v[:, None] >> np.arange(f)) & 1).astype(np.uint8).reshape(-1), bitorder="little")
    rec = {"layers": layers, "bits": bits, "width": width, "entries": len(fields), "size": size,
           "codebook": "cb", "packed": "pk"}
    inits = {"cb": onnx.numpy_helper.from_array(np.asarray(codebook, np.float32), "cb"),
             "pk": onnx.numpy_helper.from_array(packed, "pk")}
    return rec, inits


def test_decode_group_checks_stream_and_codebook():
    from toolchain.methods.quantize.onnx import decode_group, unpack_fields

    cb = [0.5, -1.0, 2.0, 3.0]
    rec, inits = _group_record([(2, 1), (2, 3)], 3, 2, [("a", 2, 0, 4)], 4, cb)  # positions 1 and 3 of 4
    book, codes, mask = decode_group(rec, inits)["a"]
    assert np.array_equal(book, cb) and np.array_equal(codes, [0, 1, 0, 3]) and np.array_equal(mask, [0, 1, 0, 1])
    rec, inits = _group_record([(5, 1)], 3, 2, [("a", 2, 0, 4)], 5, cb)  # position 4: just past the layer's 4
    with pytest.raises(ModelFormatError, match="corrupted index stream: weights past the last layer"):
        decode_group(rec, inits)
    rec, inits = _group_record([(1, 2)], 3, 2, [("a", 1, 0, 4)], 4, cb)  # a 1-bit layer with code 2
    with pytest.raises(ModelFormatError, match="corrupted code stream: layer 'a' has codes past its 2 shared values"):
        decode_group(rec, inits)
    rec, inits = _group_record([(1, 0)], 3, 2, [("a", 2, 0, 4)], 4, [0.5, np.inf, 2.0, 3.0])
    with pytest.raises(ModelFormatError, match="corrupted codebook 'cb': non-finite values"):
        decode_group(rec, inits)
    good = unpack_fields(np.array([0b101011], np.uint8), 1, 3, 3)
    assert [int(a) for a in good[0]] == [3] and [int(a) for a in good[1]] == [5]
    for bad in (np.array([43], np.int64), np.array([[43]], np.uint8), np.array([43, 0], np.uint8)):
        with pytest.raises(ModelFormatError, match="corrupted code stream"):
            unpack_fields(bad, 1, 3, 3)


def test_imported_scatter_and_dequantize_follow_onnx():
    from toolchain.methods.quantize.onnx import DequantizeLinear, ScatterElements

    data = torch.zeros(2, 3)
    upd = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows = torch.tensor([[0, 1, -1], [1, 0, 0]])  # out[rows[i, j], j] = upd[i, j]; -1 is the last row
    assert torch.equal(ScatterElements()(data, rows, upd), torch.tensor([[1.0, 5.0, 6.0], [4.0, 2.0, 3.0]]))  # axis 0
    cols = torch.tensor([[0, 2, 1], [-1, 0, 1]])  # out[i, cols[i, j]] = upd[i, j]
    assert torch.equal(ScatterElements(1)(data, cols, upd), torch.tensor([[1.0, 3.0, 2.0], [5.0, 6.0, 4.0]]))
    with pytest.raises(IndexError):
        ScatterElements()(data, torch.tensor([[2, 0, 0]]), upd[:1])
    x = torch.tensor([[10, -20, 30], [4, 5, -6]], dtype=torch.int8)
    two = torch.tensor([0.5, 2.0])  # per-row (axis 0) scales: two of them
    assert torch.equal(DequantizeLinear(0)(x, two), x.float() * two[:, None])
    assert torch.equal(DequantizeLinear(1)(x, torch.tensor(0.25)), x.float() * 0.25)
    zp = torch.tensor([1, -1, 0], dtype=torch.int8)
    assert torch.equal(DequantizeLinear(1)(x, torch.tensor([1.0, 2.0, 3.0]), zp),
                       (x.float() - zp.float()) * torch.tensor([1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------- recipe
def test_recipe_prune_then_share_composes_and_validates():
    from toolchain.driver import compress_network
    from toolchain.recipe import parse_recipe

    text = """
    [[stage]]
    pass = "prune"
    [stage.layers.default]
    density = 0.5
    [[stage]]
    pass = "quantize"
    [stage.layers.default]
    bits = 3
    [stage.layers.ip2]
    bits = 2
    """
    net = _net(density=1.0)
    res = compress_network(net, parse_recipe(text), None, progress=False)
    layers = res.net.layers()
    assert isinstance(layers["ip1"], SharedLinear) and layers["ip2"].bits == 2
    assert layers["ip1"].density() == pytest.approx(0.5, abs=0.01)
    assert len(torch.unique(layers["ip1"].weight)) <= 9  # 8 shared values + zero
    for bad, msg in (("bits = 0", "bits"), ("bits = 9", "bits"), ("init = 'kmeans++'", "init"),
                     ("method = 'fp4'", "method")):
        with pytest.raises(RecipeError, match=msg):
            parse_recipe(f'[[stage]]\npass = "quantize"\n[stage.layers.default]\n{bad}\n')
    too_many = parse_recipe('[[stage]]\npass = "quantize"\n[stage.layers.ip2]\nbits = 8\n')
    with pytest.raises(RecipeError, match="remaining weights"):
        compress_network(_net(), too_many, None, progress=False)


def test_hashed_layer_cannot_be_quantized():
    from toolchain.driver import compress_network
    from toolchain.methods.hashed.layers import hashed_from_dense
    from toolchain.recipe import parse_recipe

    net = _net()
    net.replace_layer("ip1", hashed_from_dense(net.layers()["ip1"], 50, 1))
    with pytest.raises(RecipeError, match="hashed"):
        compress_network(net, parse_recipe('[[stage]]\npass = "quantize"\n[stage.layers.ip1]\nbits = 2\n'), None,
                         progress=False)


def _quantize_pass(layers, **opts):
    from toolchain.methods import get_pass
    from toolchain.methods.quantize.pass_ import QuantizeLayerOptions, QuantizeOptions

    return get_pass("quantize")(QuantizeOptions(**opts), {n: QuantizeLayerOptions(**o) for n, o in layers.items()})


def test_quantize_layer_options_reject_bad_values_by_name():
    from toolchain.methods.quantize.pass_ import QuantizeLayerOptions
    from toolchain.recipe import parse_recipe

    assert QuantizeLayerOptions(bias_bits=16).bias_bits == 16 and QuantizeLayerOptions(bias_bits=32).bias_bits == 32
    table = '[[stage]]\npass = "quantize"\n[stage.layers.default]\nbias_bits = 16\n'
    assert parse_recipe(table).stages[0].make_pass(_net()).layer_options["ip2"].bias_bits == 16
    for kw, msg in ((dict(method="fp4"), "^method must be one of share, int8, not 'fp4'$"),
                    (dict(init="kmeans++"), "^init must be one of linear, density, random, not 'kmeans[+][+]'$"),
                    (dict(bits=True), "^bits must be an integer in 1..8, not True$"),
                    (dict(bits=2.5), "^bits must be an integer in 1..8, not 2.5$"),
                    (dict(bits=9), "^bits must be an integer in 1..8, not 9$"),
                    (dict(bias_bits=8), "^bias_bits must be 16 or 32, not 8$")):
        with pytest.raises(ValueError, match=msg):
            QuantizeLayerOptions(**kw)


def test_quantize_check_refuses_generated_weights_and_odd_padding():
    from toolchain.methods.hashed.layers import hashed_from_dense
    from toolchain.methods.lowrank.layers import svd_factorize

    why = r"its weights are generated \(hashed / low-rank\), there is no weight matrix to share values over$"
    for make, kind in ((lambda m: hashed_from_dense(m, 50, 1), "HashedLinear"),
                       (lambda m: svd_factorize(m, 2), "LowRankLinear")):
        net = _net()
        net.replace_layer("ip1", make(net.layers()["ip1"]))
        with pytest.raises(RecipeError, match=f"^quantize: layer 'ip1' is a {kind}: " + why):
            _quantize_pass({"ip1": {"bits": 2}}).check(net)
        _quantize_pass({"ip2": {"bits": 2}}).check(net)  # the other layers are fine
    for conv, mode in ((nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), "reflect"),
                       (nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"), "circular")):
        net = _net(density=1.0)
        net.replace_layer("conv1", conv)
        with pytest.raises(RecipeError, match=f"^quantize: layer 'conv1': padding_mode '{mode}' is not supported$"):
            _quantize_pass({"conv1": {"bits": 2}}).check(net)
    net = _net(density=1.0)
    net.replace_layer("conv1", nn.Conv2d(1, 4, 3, padding="same"))
    with pytest.raises(RecipeError, match="not supported"):
        _quantize_pass({"conv1": {"bits": 2}}).check(net)
    _quantize_pass({"conv1": {"bits": 2}}).check(_net(density=1.0))  # zero padding is fine


def test_quantize_check_allows_exactly_two_to_the_bits_remaining_weights():
    net = _net(density=1.0)
    with torch.no_grad():
        w = net.layers()["ip2"].weight  # 5 x 20
        w.view(-1)[8:] = 0  # 8 remaining weights
        w.view(-1)[:8] = torch.arange(1.0, 9.0)
    _quantize_pass({"ip2": {"bits": 3}}).check(net)  # 8 shared values for 8 weights: fine
    p = _quantize_pass({"ip2": {"bits": 3}})
    p.apply(net, 0)
    assert torch.equal(net.layers()["ip2"].weight.view(-1)[:8], torch.arange(1.0, 9.0))
    net = _net(density=1.0)
    with torch.no_grad():
        net.layers()["ip2"].weight.view(-1)[7:] = 0  # 7 remaining weights
    with pytest.raises(RecipeError,
                       match=r"^quantize: layer 'ip2': 8 shared values \(3 bits\) for only 7 remaining weights$"):
        _quantize_pass({"ip2": {"bits": 3}}).check(net)


def test_quantize_pass_passes_options_through_and_summarises():
    net = _net(seed=1)
    ref = {n: copy.deepcopy(m) for n, m in net.layers().items()}
    counts = {n: (m.weight.numel(), int((m.weight != 0).sum())) for n, m in net.layers().items()}
    p = _quantize_pass({"conv1": {"method": "int8"},
                        "ip1": {"bits": 3, "init": "random", "index_bits": 3, "bias_bits": 16},
                        "ip2": {"bits": 2}}, seed=7, iterations=2)
    p.apply(net, 0)
    layers = net.layers()
    expect = shared_from_dense(ref["ip1"], 3, "random", 7, 2)
    assert torch.equal(layers["ip1"].codebook, expect.codebook) and torch.equal(layers["ip1"].codes, expect.codes)
    assert not torch.equal(expect.codebook, shared_from_dense(ref["ip1"], 3, "random", 2, 100).codebook)
    assert layers["ip1"].index_bits == 3 and layers["ip1"].bias_bits == 16
    assert layers["ip2"].index_bits is None and layers["ip2"].bias_bits == 32  # 0: automatic
    assert torch.equal(layers["conv1"].qweight, int8_from_dense(ref["conv1"]).qweight)
    assert p.summary(net) == [
        f"conv1: int8 per channel over {counts['conv1'][1]:,} of 36 weights",
        f"ip1: 8 shared values (3 bits) over {counts['ip1'][1]:,} of 2,880 weights",
        f"ip2: 4 shared values (2 bits) over {counts['ip2'][1]:,} of 100 weights"]


# ----------------------------------------------------------------------------- fast form
@pytest.mark.parametrize("kind", ["share-3", "share-4", "share-6", "int8"])
def test_fast_form_runs_the_packed_custom_ops_and_equals_the_torch_layer(tmp_path, kind):
    """Fully connected quantized layers become SparseLinearCodebook / SparseLinearInt8 (weights stay
    packed); conv layers fall back to the portable decoding graph."""
    from toolchain import kernels
    from toolchain.exporter import export_compressed

    net = _net(seed=2, density=0.6).eval()
    for name, layer in list(net.layers().items()):
        bits = 2 if name == "conv1" else int(kind.split("-")[-1]) if kind != "int8" else 0  # conv1 has 21 weights
        new = int8_from_dense(layer) if kind == "int8" else shared_from_dense(layer, bits)
        if kind != "int8":
            new.bias_bits = 16
        net.replace_layer(name, new)
    model = export_compressed(net, tmp_path / "fast.onnx", form="fast")
    ops = [n.op_type for n in model.graph.node if n.domain == kernels.DOMAIN]
    assert ops == (["SparseLinearInt8"] * 2 if kind == "int8" else ["SparseLinearCodebook"] * 2)
    so = ort.SessionOptions()
    kernels.register(so)
    sess = ort.InferenceSession(str(tmp_path / "fast.onnx"), so, providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            ref = net(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-5, atol=1e-5)


def test_toolchain_export_writes_the_grouped_file(tmp_path):
    """The public export (and `toolchain export`) writes what export_quantized writes: one stream for the
    layers that share it, decoding nodes unnamed."""
    from toolchain.exporter import export_compressed

    net = _quantize(_net(), (2, 3, 3)).eval()
    grouped = export_quantized(net).SerializeToString()
    assert export_compressed(net, tmp_path / "q.onnx").SerializeToString() == grouped
    assert (tmp_path / "q.onnx").read_bytes() == grouped


def test_info_splits_a_shared_stream_between_its_layers():
    """One packed stream decoded by every layer: per-layer stored bytes add up to the file's, not 3x it."""
    from pathlib import Path

    from toolchain.measure import measure

    path = Path(__file__).resolve().parent.parent / "models" / "lenet-300-100" / "lenet-300-100-deep-compression.onnx"
    layers, totals = measure(str(path))
    per_layer = [s.stored_bytes for s in layers]
    assert len(per_layer) == 3 and all(b > 0 for b in per_layer)
    assert sum(per_layer) <= totals["stored_bytes"] < totals["file_bytes"]
    assert max(per_layer) < 0.5 * totals["stored_bytes"]


def test_dense_form_feeds_onnxruntime_quantize_dynamic(tmp_path):
    """`toolchain export --form dense` of a shipped compressed file: plain initializers, zeros kept,
    and onnxruntime's quantize_dynamic really quantizes it (integer ops, a smaller file, same answers)."""
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from toolchain.cli import main

    src = Path(__file__).resolve().parent.parent / "models" / "lenet-300-100" / "lenet-300-100-deep-compression.onnx"
    dense, q = tmp_path / "dense.onnx", tmp_path / "q.onnx"
    assert main(["export", str(src), "-o", str(dense), "--form", "dense"]) == 0
    m = onnx.load(str(dense))
    assert {n.op_type for n in m.graph.node} <= {"Gemm", "MatMul", "Add", "Relu", "Flatten", "Reshape", "Constant",
                                                 "Shape", "Gather", "Concat", "Unsqueeze"}
    weights = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.dims and len(t.dims) == 2]
    assert weights and any((w == 0).mean() > 0.9 for w in weights)  # zeros kept, dense shapes
    quantize_dynamic(str(dense), str(q), weight_type=QuantType.QInt8)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in onnx.load(str(q)).graph.node)
    assert q.stat().st_size < dense.stat().st_size / 2
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dense)]
    ys = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in runs]
    np.testing.assert_allclose(ys[1], ys[0], rtol=1e-5, atol=1e-5)
