"""protege.wire: the binary and base64-JSON layouts, their validation, and TRL's old binary reply."""

import base64
import struct

import numpy as np
import orjson
import pytest
import torch

from protege import wire


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
    assert (12 + header_len) % 8 == 0  # data section is 8-byte aligned
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
    body = wire.pack({}, {"x": np.arange(10, dtype=np.int32)})
    with pytest.raises(wire.WireError) as err:
        wire.unpack(mutate(body))
    assert err.value.field == field


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
        wire.from_json_dict({**good, "protege_wire": 2})
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
    out = wire.decode_trl_binary(orjson.dumps(payload))
    np.testing.assert_array_equal(out["topk_logprobs"].numpy(), topk_lp)
    np.testing.assert_array_equal(out["topk_ids"].numpy(), topk_ids)
    np.testing.assert_allclose(out["token_logprobs"].numpy(), actual_lp[..., 0].astype(np.float32))
    np.testing.assert_array_equal(out["token_ids"].numpy(), actual_ids[..., 0])
    assert out["completion_lengths"].tolist() == [3, 1]
    again = wire.decode_trl_binary(wire.encode_trl_binary(topk_lp, topk_ids, actual_lp, actual_ids, [3, 1]))
    for key in out:
        assert torch.equal(again[key], out[key])
    older = {k: v for k, v in payload.items() if not k.startswith("actual")}  # before actual-token fields
    assert set(wire.decode_trl_binary(older)) == {"topk_logprobs", "topk_ids", "completion_lengths"}
    with pytest.raises(wire.WireError):
        wire.decode_trl_binary({**payload, "shape": [2, 3]})
