"""The safetensors header parser treats every header as hostile."""
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsoup.io.safetensors import DTYPES
from fastsoup.io.safetensors import HeaderError, parse_header, read_header
from tests.helpers import raw_safetensors


def parse(blob: bytes, **kw):
    return parse_header(blob, len(blob), path="f.safetensors", **kw)


def good_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
            "__metadata__": {"k": "v"}}


def test_valid_header_parses():
    blob = raw_safetensors(good_header(), b"\0" * 22)
    h = parse(blob)
    assert list(h.tensors) == ["a", "b"] and h.metadata == {"k": "v"}
    assert h.data_start == 8 + len(json.dumps(good_header()))
    assert h.tensors["b"].shape == (3,) and h.tensors["b"].nbytes == 6


@pytest.mark.parametrize("blob, message", [
    (b"", "truncated file"),
    (b"\x01\x02\x03", "truncated file"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", 2**63) + b"{}", "exceeds the limit"),
    (raw_safetensors(None, raw_header=b"{not json"), "not valid JSON"),
    (raw_safetensors(None, raw_header=b"[1, 2]"), "not a JSON object"),
    (raw_safetensors(None, raw_header=b"\xff\xfe{}"), "not a JSON object"),
    (raw_safetensors(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate key"),
    (raw_safetensors(None, raw_header=b'{"\xff": 1}'), "not valid UTF-8"),
    (raw_safetensors({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "unknown dtype 'F33'"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "needs 8 bytes but data_offsets"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "non-negative integers"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
     "non-negative integers"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     "begin 4 > end 0"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
     "data_offsets must be"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "run past the end of the data section"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "overlap"),
    (raw_safetensors({"a": "nope"}), "entry is not an object"),
    (raw_safetensors({"__metadata__": {"k": 1}}), "__metadata__ must map strings"),
    (raw_safetensors({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
     "non-negative integers"),
])
def test_hostile_headers_are_rejected(blob, message):
    with pytest.raises(HeaderError, match=message) as info:
        parse(blob)
    assert "f.safetensors" in str(info.value)


def test_gaps_and_trailing_bytes_are_refused_like_the_safetensors_library():
    """Header leniency decision: match the format's readers. The safetensors library
    refuses a gap between tensors and bytes after the last one; so does fastsoup."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    gap = raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
                          b"\0" * 12)
    trailing = raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                               b"\0" * 9)
    leading = raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                              b"\0" * 8)
    for blob, message in ((gap, "leave bytes 4..8 .* after tensor 'a' unused"),
                          (trailing, "5 trailing bytes after the last tensor"),
                          (leading, "leave bytes 0..4 .* at its start unused")):
        with pytest.raises(SafetensorError):
            load(blob)
        with pytest.raises(HeaderError, match=message):
            parse(blob)


def test_read_header_records_the_files_identity(tmp_path):
    import os

    p = tmp_path / "x.safetensors"
    p.write_bytes(raw_safetensors(good_header(), b"\0" * 22))
    st = os.stat(p)
    assert read_header(str(p)).identity == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                            st.st_ctime_ns)


def test_header_size_limit():
    blob = raw_safetensors(good_header(), b"\0" * 22)
    with pytest.raises(HeaderError, match="exceeds the limit of 10 bytes"):
        parse(blob, max_header=10)


def test_read_header_from_disk(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw_safetensors(good_header(), b"\0" * 22))
    assert set(read_header(str(p)).tensors) == {"a", "b"}
    p.write_bytes(raw_safetensors(good_header(), b"\0" * 10))  # truncated data
    with pytest.raises(HeaderError, match="truncated"):
        read_header(str(p))
    with pytest.raises(HeaderError, match="is a directory"):
        read_header(str(tmp_path))


# --------------------------------------------------------------------- property tests
_dtype = st.sampled_from(sorted(DTYPES))
_shape = st.lists(st.integers(0, 5), max_size=3)


@st.composite
def valid_files(draw):
    n = draw(st.integers(0, 5))
    header, pos = {}, 0
    for i in range(n):
        dt, shape = draw(_dtype), draw(_shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * DTYPES[dt].itemsize
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    return header, raw_safetensors(header, b"\0" * pos)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_files())
def test_property_valid_files_round_trip(case):
    header, blob = case
    h = parse(blob)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(h.tensors) == set(tensors)
    for k, v in tensors.items():
        t = h.tensors[k]
        assert (t.dtype, list(t.shape), [t.begin, t.end]) == (v["dtype"], v["shape"], v["data_offsets"])
        assert h.data_start + t.end <= len(blob)


@settings(max_examples=300, deadline=None)
@given(valid_files(), st.data())
def test_property_mutations_never_crash(case, data):
    """Random byte flips and truncations: either a valid header whose ranges lie inside
    the file and do not overlap, or a HeaderError. Never another exception."""
    _, blob = case
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "length"]))
        if op == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        else:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    try:
        h = parse(bytes(blob))
    except HeaderError:
        return
    spans = sorted((t.begin, t.end) for t in h.tensors.values() if t.end > t.begin)
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        assert e0 <= b1
    for t in h.tensors.values():
        assert h.data_start + t.end <= len(blob)
        numel = 1
        for s in t.shape:
            numel *= s
        assert numel * DTYPES[t.dtype].itemsize == t.end - t.begin


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_property_random_bytes(blob):
    try:
        parse(blob)
    except HeaderError:
        pass


# ---------------------------------------------------- the bulk pass agrees with the careful one
_name = st.text(alphabet=st.sampled_from("ab:\"\\é_."), min_size=0, max_size=4)


@st.composite
def header_texts(draw):
    """Header JSON written by hand, so it can hold what json.dumps never writes: duplicate
    keys (top level and inside entries), names with ':' and escapes, entries out of offset
    order, gaps, overlaps, zero-sized tensors, extra or missing fields."""
    pairs, pos = [], 0
    compact = draw(st.booleans())  # the writers' form (no spaces): the compiled scan's
    dumps = (lambda o, **kw: json.dumps(o, separators=(",", ":"), **kw)) if compact else json.dumps
    for i in range(draw(st.integers(0, 5))):
        dt, shape = draw(_dtype), draw(_shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * DTYPES[dt].itemsize
        begin = pos + draw(st.sampled_from([0, 0, 0, 1, -1]))
        fields = [("dtype", dumps(dt)), ("shape", dumps(shape)),
                  ("data_offsets", dumps([begin, begin + nbytes]))]
        if draw(st.integers(0, 9)) == 0:
            fields.append(draw(st.sampled_from(fields + [("x", '"a:b"')])))
        if draw(st.integers(0, 9)) == 0:
            fields.pop(draw(st.integers(0, len(fields) - 1)))
        name = draw(st.sampled_from([f"t{i}", f"t:{i}", f"t{i}" + draw(_name)]))
        pairs.append((name, "{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}"))
        pos = max(pos, begin + nbytes)
    if pairs and draw(st.booleans()):
        pairs.append(draw(st.sampled_from(pairs)))                 # a duplicate tensor
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    if draw(st.booleans()):
        meta = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
        at = draw(st.sampled_from([0, len(pairs)]))
        pairs.insert(at, ("__metadata__", dumps(meta, ensure_ascii=draw(st.booleans()))))
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    text += " " * draw(st.sampled_from([0, 0, 3]))  # the writers pad to 8 bytes with spaces
    return text.encode("utf-8", "surrogatepass"), pos + draw(st.sampled_from([0, 0, 1]))


@settings(max_examples=400, deadline=None)
@given(header_texts())
def test_property_bulk_pass_agrees_with_the_careful_pass(case):
    from fastsoup.io import safetensors as sf

    text, data_len = case
    blob = struct.pack("<Q", len(text)) + text + b"\0" * data_len

    def run():
        try:
            h = parse(blob)
        except HeaderError:
            return "error"
        return list(h.tensors.items()), h.metadata

    results = []
    real = sf._parse_columns, sf._parse_fast
    try:
        for columns, bulk in ((True, True), (True, False), (False, True), (False, False)):
            sf._parse_columns = real[0] if columns else (lambda *a: None)
            sf._parse_fast = real[1] if bulk else (lambda *a: None)
            results.append(run())
    finally:
        sf._parse_columns, sf._parse_fast = real
    assert results[1:] == results[:-1]  # the compiled scan, the bulk and the careful pass


@st.composite
def writer_texts(draw):
    """Headers in the writers' compact form (the compiled scan's), then edited a few
    characters at a time: every way of leaving that form by a little."""
    header, pos = {}, 0
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(
            st.text(alphabet="ab:é", max_size=3), st.text(alphabet="ab:é", max_size=3), max_size=2))
    for i in range(draw(st.integers(0, 4))):
        dt = draw(_dtype)
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 7, 2**31, 2**62]), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dt].itemsize
        header[draw(st.sampled_from([f"t{i}", f"t:{i}", f"é{i}"]))] = {
            "dtype": dt, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    text += " " * (-len(text.encode()) % 8)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["put", "drop", "copy"]))
        if edit == "put":
            text = text[:at] + draw(st.sampled_from('":,09[]{}- \\xé.')) + text[at + 1:]
        elif edit == "drop":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + text[at:at + draw(st.integers(1, 30))] + text[at:]
    return text.encode(), min(pos, 1 << 20) + draw(st.sampled_from([0, 0, 1]))


@settings(max_examples=400, deadline=None)
@given(writer_texts())
def test_property_compiled_scan_agrees_on_edited_writer_headers(case):
    """The compiled scan, the bulk pass and the careful pass give the same tensors and
    metadata, or the same error, whatever the edit."""
    test_property_bulk_pass_agrees_with_the_careful_pass.hypothesis.inner_test(case)


def test_compiled_scan_takes_the_writers_form_and_hands_over_the_rest():
    """``_C.header_columns`` reads the form the safetensors writers produce (compact,
    padded with spaces, metadata first or last) and hands anything else to the Python
    passes: whitespace, escapes, fields in another order, a duplicate key, tensors out
    of offset order, a dtype it does not know."""
    from fastsoup.io import safetensors as sf

    if getattr(sf._ext.cpu_ext(warn=False), "header_columns", None) is None:
        pytest.skip("fastsoup._C is not built")
    obj = good_header()
    obj["__metadata__"] = {"format": "pt", "a:b": "c:d"}
    good = json.dumps(obj, separators=(",", ":"))
    got = sf._parse_columns((good + "   ").encode(), 22)
    assert got is not None and got == sf._parse_fast(good, 0, 22)
    assert got[1] == {"format": "pt", "a:b": "c:d"}
    assert list(got[0]) == [k for k in obj if k != "__metadata__"]
    refused = {
        "space": good.replace(":", ": ", 1),
        "escape": good.replace('"a"', '"\\u0061"'),
        "field order": good.replace('"dtype":"BF16","shape":[3]', '"shape":[3],"dtype":"BF16"'),
        "duplicate": good.replace('"b":', '"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":'),
        "meta duplicate": good.replace('"format":"pt"', '"format":"pt","format":"x"'),
        "unknown dtype": good.replace('"F32"', '"F31"'),
        "leading zero": good.replace("[3]", "[03]"),
        "dim past int64": good.replace("[3]", f"[{2**64 + 3}]"),  # 3 if it wrapped
        "offset past int64": good.replace("[16,22]", f"[16,{2**64 + 22}]"),
        "tail": good + " x",
    }
    for name, text in refused.items():
        assert text != good, name
        assert sf._parse_columns(text.encode(), 22) is None, name
    swapped = json.dumps(dict(reversed(list(good_header().items()))), separators=(",", ":"))
    assert sf._parse_columns(swapped.encode(), 22) is None
    assert sf._parse_fast(swapped, 0, 22) is not None  # the bulk pass sorts by offset


def test_bulk_pass_is_taken_and_refuses_duplicates():
    """The bulk pass accepts a plain header (not handing it to the careful pass) and hands
    over those with a duplicate key, which the careful pass names."""
    from fastsoup.io import safetensors as sf

    good = json.dumps(good_header(), separators=(",", ":"))
    assert sf._parse_fast(good, 8 + len(good), 22) is not None
    dup = good.replace('"b":', '"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":')
    assert sf._parse_fast(dup.replace('"a":{"dtype":"F32","shape":[0]', '"c":{"dtype":"F32","shape":[0]'),
                          0, 22) is not None
    assert sf._parse_fast(dup, 0, 22) is None
    inner = good.replace('"shape":[3]', '"shape":[3],"shape":[3]')
    assert sf._parse_fast(inner, 0, 22) is None
    blob = raw_safetensors(None, raw_header=inner.encode()) + b"\0" * 22
    with pytest.raises(HeaderError, match="duplicate key 'shape'"):
        parse(blob)


def test_identical_headers_are_parsed_once_within_shared_headers(tmp_path, monkeypatch):
    from fastsoup.io import safetensors as sf

    blob = raw_safetensors(good_header(), b"\0" * 22)
    for name in "abc":
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
    (tmp_path / "d.safetensors").write_bytes(blob[:-1])              # truncated: other size
    calls = []
    real = sf._parse_fast
    monkeypatch.setattr(sf, "_parse_fast", lambda *a: calls.append(1) or real(*a))
    with sf.shared_headers():
        a, b, c = (read_header(str(tmp_path / f"{n}.safetensors")) for n in "abc")
        with pytest.raises(HeaderError, match="truncated"):
            read_header(str(tmp_path / "d.safetensors"))
    assert len(calls) == 2 and a.tensors is b.tensors is c.tensors
    assert (a.path, b.path) == (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert a.identity != b.identity and a.metadata == b.metadata and a.metadata is not b.metadata
    calls.clear()
    d = read_header(str(tmp_path / "a.safetensors"))                  # outside: parsed again
    assert calls == [1] and d.tensors == a.tensors and d.tensors is not a.tensors
