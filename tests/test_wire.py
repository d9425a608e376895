"""protege.wire: the binary and base64-JSON layouts, their validation (the version-3 crc32 included),
and TRL's old binary reply."""

import base64
import struct
import zlib

import numpy as np
import orjson
import pytest
import torch

from protege import wire
from protege.server import compat


def _arrays(rng):
    return {
        "token_logprobs": rng.standard_normal((3, 5)).astype(np.float32),  # (N, T)
        "topk_ids": rng.integers(0, 1000, (3, 5, 4)).astype(np.int32),  # (N, T, K)
        "empty": np.zeros((0, 7), np.float32),
        "scalarish": np.array([42], np.int32),
    }


def test_binary_roundtrip_is_exact_and_aligned():
    arrays = _arrays(np.random.default_rng(0))
    body = wire.pack({"topk": 4, "note": "é"}, arrays)
    assert body[:4] == b"PRTG" and struct.unpack_from("<H", body, 4)[0] == wire.VERSION
    header_len = struct.unpack_from("<I", body, 8)[0]
    assert (16 + header_len) % 8 == 0  # data section is 8-byte aligned (version 3: 16-byte prefix)
    crc = zlib.crc32(body[16:], zlib.crc32(body[:12]))  # the documented coverage, computed here
    assert struct.unpack_from("<I", body, 12)[0] == crc
    meta, out = wire.unpack(body)
    assert meta == {"topk": 4, "note": "é"}
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(out[name], a)
    # from a bytearray the views are writable, so torch wraps them without copying or warnings
    _, out = wire.unpack(bytearray(body))
    assert out["topk_ids"].flags.writeable
    assert torch.from_numpy(out["topk_ids"]).data_ptr() == out["topk_ids"].ctypes.data


def test_json_roundtrip_and_dtype_coercion():
    arrays = {"lp": torch.randn(2, 3, dtype=torch.float64), "ids": torch.arange(6).reshape(2, 3)}
    obj = orjson.loads(orjson.dumps(wire.to_json_dict({"a": 1}, arrays)))
    meta, out = wire.from_json_dict(obj)
    assert meta == {"a": 1}
    assert out["lp"].dtype == np.float32 and out["ids"].dtype == np.int32
    np.testing.assert_allclose(out["lp"], arrays["lp"].numpy().astype(np.float32))
    np.testing.assert_array_equal(out["ids"], arrays["ids"].numpy())
    with pytest.raises(TypeError, match="cannot go on the wire"):
        wire.pack({}, {"s": np.array(["a"])})


def test_score_response_decodes_to_tensors_both_forms():
    result = {"completion_lengths": np.array([3, 1], np.int32), "token_logprobs": -np.ones((2, 3), np.float32),
              "topk_ids": np.ones((2, 3, 2), np.int32)}
    for binary, ctype in ((True, wire.BINARY_MEDIA_TYPE), (False, "application/json")):
        body = wire.encode_score_response(result, {"topk": 2}, binary=binary)
        meta, t = wire.decode_score_response(body, ctype)
        assert meta == {"topk": 2}
        assert t["topk_ids"].dtype == torch.int64 and t["token_logprobs"].dtype == torch.float32
        assert t["completion_lengths"].tolist() == [3, 1]


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b[:6], "body"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "version"),
    (lambda b: b[:8] + struct.pack("<I", 10**6) + b[12:], "header"),
    (lambda b: b[:-4], "arrays.x"),  # truncated data
    (lambda b: b[:12] + b"}" + b[13:], "header"),  # header JSON broken
])
def test_binary_errors_name_the_field(mutate, field):
    body = wire.pack({}, {"x": np.arange(10, dtype=np.int32)}, version=2)  # no checksum: each field's own check
    with pytest.raises(wire.WireError) as err:
        wire.unpack(mutate(body))
    assert err.value.field == field


def test_version_3_checksum_catches_every_single_bit_flip_and_truncation():
    """Any one flipped bit of a version-3 body is refused (past the magic/version/flags: as "checksum"),
    where version 2 decodes a flipped data bit into a wrong number without a word."""
    arrays = {"lp": -np.linspace(0.5, 3, 6, dtype=np.float32), "ids": np.arange(6, dtype=np.int32)}
    body = wire.pack({"topk": 2}, arrays)
    for pos in range(len(body)):
        for bit in range(8):
            bad = bytearray(body)
            bad[pos] ^= 1 << bit
            with pytest.raises(wire.WireError) as err:
                wire.read_binary(bad)
            if pos >= 6:
                assert err.value.field == "checksum", (pos, bit, err.value)
    for cut in (1, 4, 8, len(body) - 16):
        with pytest.raises(wire.WireError, match="truncated") as err:
            wire.read_binary(body[:-cut])
        assert err.value.field == "checksum"
    v2 = bytearray(wire.pack({"topk": 2}, arrays, version=2))
    v2[-8] ^= 0x40  # a bit of the last ids entry's neighbour, in the data section
    _, _, out = wire.read_binary(v2)  # version 2 has no checksum: nothing notices
    assert not np.array_equal(out["ids"], arrays["ids"])


def test_version_3_json_form_carries_a_crc32_per_array():
    arrays = {"x": np.arange(4, dtype=np.int32)}
    obj = orjson.loads(orjson.dumps(wire.to_json_dict({}, arrays)))
    assert obj["protege_wire"] == 3 and obj["arrays"]["x"]["crc32"] == zlib.crc32(np.arange(4, dtype="<i4").tobytes())
    flipped = bytearray(base64.b64decode(obj["arrays"]["x"]["b64"]))
    flipped[5] ^= 1
    bad = {**obj, "arrays": {"x": {**obj["arrays"]["x"], "b64": base64.b64encode(flipped).decode()}}}
    with pytest.raises(wire.WireError, match="crc32") as err:
        wire.from_json_dict(bad)
    assert err.value.field == "checksum"
    missing = {**obj, "arrays": {"x": {k: v for k, v in obj["arrays"]["x"].items() if k != "crc32"}}}
    with pytest.raises(wire.WireError) as err:
        wire.from_json_dict(missing)
    assert err.value.field == "arrays.x.crc32"
    older = wire.to_json_dict({}, arrays, version=2)  # version 2 has no crc32 and needs none
    assert "crc32" not in older["arrays"]["x"] and wire.from_json_dict(older)[1]["x"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("entry, field", [
    (["x", "f8", [2], 0], "arrays.x.dtype"),
    (["x", "i4", [-1], 0], "arrays.x.shape"),
    (["x", "i4", [1, 1, 1, 1, 1], 0], "arrays.x.shape"),
    (["x", "i4", [2], 3], "arrays.x.offset"),
    (["x", "i4", [10**9], 0], "arrays.x"),
    (["x", "i4"], "arrays"),
])
def test_header_entries_are_validated(entry, field):
    header = orjson.dumps({"meta": {}, "arrays": [entry]})
    header += b" " * ((-(12 + len(header))) % 8)
    body = struct.pack("<4sHHI", b"PRTG", 1, 0, len(header)) + header + b"\0" * 16
    with pytest.raises(wire.WireError) as err:
        wire.unpack(body)
    assert err.value.field == field


def test_json_form_errors():
    good = wire.to_json_dict({}, {"x": np.arange(4, dtype=np.int32)})
    with pytest.raises(wire.WireError, match="protege_wire"):
        wire.from_json_dict({**good, "protege_wire": 4})
    bad_b64 = {**good, "arrays": {"x": {**good["arrays"]["x"], "b64": "!!!"}}}
    with pytest.raises(wire.WireError, match="base64"):
        wire.from_json_dict(bad_b64)
    short = {**good, "arrays": {"x": {**good["arrays"]["x"], "shape": [5]}}}
    with pytest.raises(wire.WireError, match="needs 20"):
        wire.from_json_dict(short)


def test_score_request_layout():
    seqs = [np.array([1, 2, 3, 4], np.int32), np.array([5, 6], np.int32)]
    query = np.arange(6, dtype=np.int32).reshape(3, 2)  # completion positions 2 + 1, M = 2
    meta, arrays = wire.unpack(wire.encode_score_request(seqs, [2, 1], topk=3, temperature=0.5, query_ids=query))
    assert meta == {"topk": 3, "temperature": 0.5}
    np.testing.assert_array_equal(arrays["tokens"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(arrays["sequence_lengths"], [4, 2])
    np.testing.assert_array_equal(arrays["prompt_lengths"], [2, 1])
    np.testing.assert_array_equal(arrays["query_ids"], query)


# ---------------------------------------------------------------------------------------------
# Version 2: uint16 ids, float16 logprobs; version 1 still read.
# ---------------------------------------------------------------------------------------------

def _result(rng, vocab):
    """A padded score result as a backend returns it (N=3, T=5, K=4, M=2)."""
    lp = lambda *shape: -rng.exponential(3.0, shape).astype(np.float32)  # noqa: E731
    topk_lp = lp(3, 5, 4)
    topk_lp[0, 0, 3] = -np.inf  # an impossible token
    return {"completion_lengths": np.array([5, 2, 0], np.int32), "token_logprobs": lp(3, 5),
            "topk_ids": rng.integers(0, vocab, (3, 5, 4)).astype(np.int32), "topk_logprobs": topk_lp,
            "query_logprobs": lp(3, 5, 2)}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
@pytest.mark.parametrize("vocab, ids_code", [(49152, "u2"), (65536, "u2"), (65537, "i4"), (262144, "i4"),
                                             (None, "i4")])
def test_score_response_roundtrip_each_dtype(binary, logprob_dtype, vocab, ids_code):
    result = _result(np.random.default_rng(3), vocab or 1000)
    result["topk_ids"][0, 0, :2] = [0, (vocab or 1000) - 1]  # both ends of the vocabulary
    body = wire.encode_score_response(result, {"topk": 4}, binary=binary, vocab_size=vocab,
                                      logprob_dtype=logprob_dtype)
    version, _, raw = (wire.read_binary(body) if binary else wire.read_json_dict(orjson.loads(body)))
    assert version == wire.VERSION == 3
    lp_code = wire.LOGPROB_DTYPES[logprob_dtype]
    assert {n: a.dtype.str[1:] for n, a in raw.items()} == {
        "completion_lengths": "i4", "topk_ids": ids_code, "token_logprobs": lp_code, "topk_logprobs": lp_code,
        "query_logprobs": lp_code}
    meta, t = wire.decode_score_response(body, wire.BINARY_MEDIA_TYPE if binary else wire.JSON_MEDIA_TYPE)
    assert meta == {"topk": 4}
    assert t["topk_ids"].dtype == t["completion_lengths"].dtype == torch.int64
    assert torch.equal(t["topk_ids"], torch.from_numpy(result["topk_ids"]).long())  # ids are always lossless
    assert torch.equal(t["completion_lengths"], torch.tensor([5, 2, 0]))
    for name in ("token_logprobs", "topk_logprobs", "query_logprobs"):
        got, ref = t[name], torch.from_numpy(result[name])
        assert got.dtype == torch.float32
        if logprob_dtype == "float32":
            assert torch.equal(got, ref)
        else:  # the documented trade: <= 2^-11 relative, -inf kept
            torch.testing.assert_close(got, ref, rtol=2.0 ** -11, atol=3e-8)
    assert t["topk_logprobs"][0, 0, 3] == -np.inf
    bytes_per_entry = {("float32", "i4"): 8, ("float32", "u2"): 6, ("float16", "i4"): 6, ("float16", "u2"): 4}
    assert raw["topk_ids"].nbytes + raw["topk_logprobs"].nbytes == 60 * bytes_per_entry[logprob_dtype, ids_code]


def test_uint16_ids_are_lossless_or_refused():
    ids = np.array([0, 1, 65535], np.int64)
    _, out = wire.unpack(wire.pack({}, {"ids": ids}, dtypes={"ids": "u2"}))
    assert out["ids"].dtype == np.dtype("<u2") and out["ids"].tolist() == [0, 1, 65535]
    for bad in ([65536], [-1]):
        with pytest.raises(ValueError, match="do not fit uint16"):
            wire.pack({}, {"ids": np.array(bad)}, dtypes={"ids": "u2"})
    with pytest.raises(TypeError, match="as u2"):
        wire.pack({}, {"ids": np.array([1.0])}, dtypes={"ids": "u2"})
    with pytest.raises(TypeError, match="as f2"):
        wire.pack({}, {"lp": np.array([1])}, dtypes={"lp": "f2"})
    with pytest.raises(ValueError, match="needs wire version 2"):
        wire.pack({}, {"ids": ids}, dtypes={"ids": "u2"}, version=1)


def test_float16_precision_is_as_documented():
    x = np.concatenate([np.linspace(-30, 0, 2_000_001, dtype=np.float32),
                        -np.random.default_rng(0).exponential(5, 200_000).astype(np.float32).clip(0, 30)])
    err = np.abs(wire.to_float16(x).astype(np.float64) - x)
    assert err.max() <= 2.0 ** -7  # 0.0078125, the documented max abs error on [-30, 0]
    small = np.abs(x) < 1
    assert err[small].max() <= 2.0 ** -12
    normal = np.abs(x) >= 2.0 ** -14
    assert (err[normal] / np.abs(x[normal])).max() <= 2.0 ** -11
    special = np.array([-np.inf, np.inf, np.nan, -1e5, -65504, -65519.0, -65520.0, 1e6, -0.0], np.float32)
    out = wire.to_float16(special)
    assert out[0] == -np.inf and out[1] == np.inf and np.isnan(out[2])
    assert out[3:7].tolist() == [-65504.0] * 4 and out[7] == 65504.0 and out[8] == 0


def test_score_request_ids_dtype_and_logprob_dtype():
    small = [np.array([1, 65535, 3], np.int32)]
    _, _, arrays = wire.read_binary(wire.encode_score_request(small, [1], topk=2))
    assert arrays["tokens"].dtype == np.dtype("<u2") and arrays["prompt_lengths"].dtype == np.dtype("<i4")
    big = [np.array([1, 65536, 3], np.int32)]
    meta, arrays = wire.unpack(wire.encode_score_request(big, [1], logprob_dtype="float16",
                                                         query_ids=np.array([[70000], [2]], np.int32)))
    assert arrays["tokens"].dtype == arrays["query_ids"].dtype == np.dtype("<i4")
    assert meta == {"topk": 0, "temperature": 1.0, "logprob_dtype": "float16"}
    version, meta, arrays = wire.read_binary(wire.encode_score_request(small, [1], version=1))
    assert version == 1 and arrays["tokens"].dtype == np.dtype("<i4") and "logprob_dtype" not in meta
    with pytest.raises(ValueError, match="needs wire version 2"):
        wire.encode_score_request(small, [1], logprob_dtype="float16", version=1)
    with pytest.raises(ValueError, match="logprob_dtype"):
        wire.encode_score_request(small, [1], logprob_dtype="bfloat16")


# Version-1 payloads as protege's v1 encoder (commit 3ecd6b3) wrote them: a score reply for result
# V1_RESULT with meta {"model": "tiny", "topk": 2, "temperature": 1.0} (binary and base64-JSON), and
# the request encode_score_request([[1, 2, 3], [4, 5]], [1, 1], topk=2, temperature=0.5).
V1_REPLY_BINARY = (
    "UFJURwEAAADEAAAAeyJtZXRhIjp7Im1vZGVsIjoidGlueSIsInRvcGsiOjIsInRlbXBlcmF0dXJlIjoxLjB9LCJhcnJheXMiOltbImNvbXBs"
    "ZXRpb25fbGVuZ3RocyIsImk0IixbMl0sMF0sWyJ0b2tlbl9sb2dwcm9icyIsImY0IixbMiwyXSw4XSxbInRvcGtfaWRzIiwiaTQiLFsyLDIs"
    "Ml0sMjRdLFsidG9wa19sb2dwcm9icyIsImY0IixbMiwyLDJdLDU2XV19ICAgIAIAAAABAAAAAAAAvwAAUMAAAIC/AAAAAAcAAAD//wAAcBEB"
    "AAAAAAADAAAABAAAAAAAAAAAAAAAAACAvgAAAMAAAAC+AACA/wAAwL8AAOC/AAAAAAAAAAA=")
V1_REPLY_JSON = (
    b'{"protege_wire":1,"meta":{"model":"tiny","topk":2,"temperature":1.0},"arrays":{"completion_lengths":'
    b'{"dtype":"i4","shape":[2],"b64":"AgAAAAEAAAA="},"token_logprobs":{"dtype":"f4","shape":[2,2],"b64":'
    b'"AAAAvwAAUMAAAIC/AAAAAA=="},"topk_ids":{"dtype":"i4","shape":[2,2,2],"b64":'
    b'"BwAAAP//AABwEQEAAAAAAAMAAAAEAAAAAAAAAAAAAAA="},"topk_logprobs":{"dtype":"f4","shape":[2,2,2],"b64":'
    b'"AACAvgAAAMAAAAC+AACA/wAAwL8AAOC/AAAAAAAAAAA="}}}')
V1_REQUEST_BINARY = (
    "UFJURwEAAACMAAAAeyJtZXRhIjp7InRvcGsiOjIsInRlbXBlcmF0dXJlIjowLjV9LCJhcnJheXMiOltbInRva2VucyIsImk0IixbNV0sMF0s"
    "WyJzZXF1ZW5jZV9sZW5ndGhzIiwiaTQiLFsyXSwyNF0sWyJwcm9tcHRfbGVuZ3RocyIsImk0IixbMl0sMzJdXX0gICAgICABAAAAAgAAAAMA"
    "AAAEAAAABQAAAAAAAAADAAAAAgAAAAEAAAABAAAA")
V1_RESULT = {"completion_lengths": np.array([2, 1], np.int32),
             "token_logprobs": np.array([[-0.5, -3.25], [-1.0, 0.0]], np.float32),
             "topk_ids": np.array([[[7, 65535], [70000, 0]], [[3, 4], [0, 0]]], np.int32),
             "topk_logprobs": np.array([[[-0.25, -2.0], [-0.125, -np.inf]], [[-1.5, -1.75], [0, 0]]], np.float32)}


def test_version_1_payloads_still_decode_and_encode_byte_for_byte():
    meta = {"model": "tiny", "topk": 2, "temperature": 1.0}
    v1_binary = base64.b64decode(V1_REPLY_BINARY)
    for body, ctype in ((v1_binary, wire.BINARY_MEDIA_TYPE), (V1_REPLY_JSON, wire.JSON_MEDIA_TYPE)):
        got_meta, t = wire.decode_score_response(body, ctype)
        assert got_meta == meta
        for name, ref in V1_RESULT.items():
            expected = torch.from_numpy(ref.astype(np.int64) if ref.dtype.kind == "i" else ref)
            assert t[name].dtype == expected.dtype and torch.equal(t[name], expected), name
    assert wire.read_binary(v1_binary)[0] == 1 and wire.read_json_dict(orjson.loads(V1_REPLY_JSON))[0] == 1
    # the version-1 encoder path is still here and writes the very same bytes
    assert wire.encode_score_response(V1_RESULT, meta, binary=True, vocab_size=49152, version=1) == v1_binary
    assert wire.encode_score_response(V1_RESULT, meta, binary=False, vocab_size=49152, version=1) == V1_REPLY_JSON
    request = wire.encode_score_request([np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)], [1, 1],
                                        topk=2, temperature=0.5, version=1)
    assert request == base64.b64decode(V1_REQUEST_BINARY)


@pytest.mark.parametrize("version", [0, 4, 255])
def test_unknown_versions_are_refused_clearly(version):
    body = wire.pack({}, {"x": np.arange(3, dtype=np.int32)})
    with pytest.raises(wire.WireError, match=f"wire version {version} is not supported; this side reads "
                                             "versions 1, 2, 3") as err:
        wire.unpack(body[:4] + struct.pack("<H", version) + body[6:])
    assert err.value.field == "version"
    obj = wire.to_json_dict({}, {"x": np.arange(3, dtype=np.int32)})
    with pytest.raises(wire.WireError, match=f"wire version {version} is not supported") as err:
        wire.from_json_dict({**obj, "protege_wire": version})
    assert err.value.field == "protege_wire"


@pytest.mark.parametrize("foreign", [{"detail": "Not Found"}, {"object": "list", "data": []}, [1, 2], "<html>"])
def test_foreign_json_is_not_blamed_on_the_wire_version(foreign):
    """An unrelated JSON body (another server's error page, a proxy's) is named as not protege's."""
    with pytest.raises(wire.WireError, match="not a protege wire payload") as err:
        wire.from_json_dict(foreign)
    assert "version" not in str(err.value)
    with pytest.raises(wire.WireError, match="not valid JSON"):
        wire.decode(b"<html><body>502 Bad Gateway</body></html>", "application/json")


def test_version_1_header_cannot_name_version_2_dtypes():
    body = bytearray(wire.pack({}, {"ids": np.arange(3)}, dtypes={"ids": "u2"}, version=2))
    body[4:6] = struct.pack("<H", 1)  # a v2 body relabelled as v1
    with pytest.raises(wire.WireError, match="need wire version 2") as err:
        wire.unpack(bytes(body))
    assert err.value.field == "arrays.ids.dtype"


def _trl_server_payload(topk_lp, topk_ids, actual_lp, actual_ids, lengths):
    """What TRL 1.3-1.8's vllm_serve wrote (its _format_logprob_response, binary branch)."""
    b, t, k = topk_lp.shape
    return {
        "logprobs_b64": base64.b64encode(topk_lp.astype(np.float32).tobytes()).decode("ascii"),
        "token_ids_b64": base64.b64encode(topk_ids.astype(np.int32).tobytes()).decode("ascii"),
        "actual_logprobs_b64": base64.b64encode(actual_lp.astype(np.float32).tobytes()).decode("ascii"),
        "actual_token_ids_b64": base64.b64encode(actual_ids.astype(np.int32).tobytes()).decode("ascii"),
        "shape": [b, t, k],
        "completion_lengths": lengths,
    }


def test_trl_binary_decode_matches_trl_layout_and_roundtrips():
    rng = np.random.default_rng(1)
    topk_lp = np.full((2, 3, 4), -np.inf, np.float32)
    topk_lp[0, :3] = rng.standard_normal((3, 4))
    topk_lp[1, :1] = rng.standard_normal((1, 4))
    topk_ids = rng.integers(0, 50, (2, 3, 4))
    actual_lp, actual_ids = rng.standard_normal((2, 3, 1)), rng.integers(0, 50, (2, 3, 1))
    payload = _trl_server_payload(topk_lp, topk_ids, actual_lp, actual_ids, [3, 1])
    out = compat.decode_trl_binary(orjson.dumps(payload))
    np.testing.assert_array_equal(out["topk_logprobs"].numpy(), topk_lp)
    np.testing.assert_array_equal(out["topk_ids"].numpy(), topk_ids)
    np.testing.assert_allclose(out["token_logprobs"].numpy(), actual_lp[..., 0].astype(np.float32))
    np.testing.assert_array_equal(out["token_ids"].numpy(), actual_ids[..., 0])
    assert out["completion_lengths"].tolist() == [3, 1]
    again = compat.decode_trl_binary(compat.encode_trl_binary(topk_lp, topk_ids, actual_lp, actual_ids, [3, 1]))
    for key in out:
        assert torch.equal(again[key], out[key])
    older = {k: v for k, v in payload.items() if not k.startswith("actual")}  # before actual-token fields
    assert set(compat.decode_trl_binary(older)) == {"topk_logprobs", "topk_ids", "completion_lengths"}
    with pytest.raises(wire.WireError):
        compat.decode_trl_binary({**payload, "shape": [2, 3]})
