"""The wire protocol in memory: every op round-trips, every malformed input is refused
with its code before any handler could run."""

from __future__ import annotations

import msgpack
import pytest

from common import protocol
from common.errors import EXIT_STATUS, Code, FaasError
from common.schema import Bool, Bytes, Float, Int, IPv6, List, MapOf, Record, Str

# A valid argument set for every op in the table; a new op without one fails here.
SAMPLE_ARGS = {
    ("controller", "ping"): {},
    ("controller", "status"): {},
    ("netagent", "ping"): {},
    ("netagent", "sync"): {"generation": 3, "state": {
        "addresses": ["fd00:faa5:1::a"],
        "peers": [{"public_key": "A" * 43 + "=", "address": "fd00:faa5:0:100::2"}],
        "egress": [{"name": "fib", "address": "fd00:faa5:1::a", "egress_allow": ["10.0.0.0/8"],
                    "may_call": [{"address": "fd00:faa5:1::b", "ports": [80]}]}],
        "ports": [{"address": "fd00:faa5:1::a", "ports": [80, 5432]}]}},
    ("netagent", "wg_info"): {},
    ("runner", "stats"): {},
    ("controller", "stats"): {},
    ("netagent", "peers"): {},
    ("controller", "vpn_add"): {"name": "laptop", "public_key": None, "expires": "7d"},
    ("controller", "vpn_list"): {},
    ("controller", "vpn_rm"): {"name": "laptop"},
    ("controller", "token_create"): {"name": "ci", "role": "deploy", "expires": "30d"},
    ("controller", "token_list"): {},
    ("controller", "token_rm"): {"name": "ci"},
    ("controller", "volume_create"): {"name": "data", "size": "1G"},
    ("controller", "volume_list"): {},
    ("controller", "volume_rm"): {"name": "data"},
    ("runner", "volume_create"): {"name": "data", "size": 1 << 30},
    ("runner", "volume_list"): {},
    ("runner", "volume_rm"): {"name": "data"},
    ("controller", "secret_create"): {"name": "db", "value": b"s3cret\x00"},
    ("controller", "secret_list"): {},
    ("controller", "secret_rm"): {"name": "db"},
    ("runner", "secret_put"): {"name": "db", "value": b"s3cret\x00"},
    ("runner", "secret_list"): {},
    ("runner", "secret_rm"): {"name": "db"},
    ("controller", "vpn_disable"): {"name": "laptop"},
    ("controller", "vpn_enable"): {"name": "laptop"},
    ("dnsagent", "ping"): {},
    ("dnsagent", "sync"): {"generation": 0, "state": {"records": [
        {"name": "fib", "address": "fd00:faa5:1::a"}]}},
    ("runner", "ping"): {},
    ("runner", "sync"): {"generation": 7, "state": {
        "images": ["sha256:" + "a" * 64],
        "functions": [{
            "name": "fib", "address": "fd00:faa5:1::a", "digest": "sha256:" + "a" * 64,
            "settings": {"memory": 1 << 29, "cpu": 1.0, "pids": 128, "timeout": 30.0,
                         "concurrency": 16, "queue": 64, "min_warm": 0, "reuse": False,
                         "idle_timeout": 60.0, "first_byte_timeout": 5.0, "per_client": 0,
                         "network": "egress", "egress_allow": ["10.0.0.0/8:5432"],
                         "may_call": ["echo"], "secrets": ["db"], "mounts": ["data:/data"],
                         "ports": [80, 5432], "allow": ["*"], "env": {"A": "b"}},
        }],
        "peers": [{"name": "laptop", "address": "fd00:faa5:0:100::2"}]}},
    ("runner", "image_add"): {"upload": "0" * 32, "tag": None},
    ("runner", "image_progress"): {"upload": "0" * 32},
    ("controller", "upload_begin"): {"name": "fib", "tag": "fib:latest"},
    ("controller", "upload_chunk"): {"upload": "f" * 32, "offset": 0, "data": b"\x00tar"},
    ("controller", "upload_abort"): {"upload": "f" * 32},
    ("controller", "deploy"): {"upload": "f" * 32},
    ("controller", "deploy_progress"): {"upload": "f" * 32},
    ("controller", "list"): {},
    ("controller", "info"): {"name": "fib"},
    ("controller", "ip"): {"name": "a"},
    ("controller", "versions"): {"name": "my-fn-2"},
    ("controller", "rollback"): {"name": "fib", "version": 2},
    ("controller", "rm"): {"name": "fib"},
    ("controller", "logs"): {"name": "fib", "since": 1.5, "offset": 10},
    ("controller", "set"): {"name": "fib", "settings": {"memory": "256M", "env.A": "b"}},
}


def all_ops():
    return [(svc, name) for svc, ops in protocol.OPS.items() for name in ops]


def envelope(**over):
    env = {"v": 1, "id": "abc123", "op": "ping", "args": {}}
    env.update(over)
    return env


def refuse(body: bytes, service: str | None = None) -> FaasError:
    if service is None:
        try:
            obj = msgpack.unpackb(body, strict_map_key=False)
        except Exception:
            obj = None
        obj = obj if isinstance(obj, dict) else {}
        service = "controller" if obj.get("op") == "upload_chunk" else "netagent"
    with pytest.raises(FaasError) as info:
        protocol.parse_request(body, service)
    return info.value


def test_every_op_has_sample_args():
    assert sorted(all_ops()) == sorted(SAMPLE_ARGS)


@pytest.mark.parametrize("service,name", all_ops())
def test_round_trip_every_op(service, name):
    args = SAMPLE_ARGS[(service, name)]
    body = protocol.make_request(name, args, "r1.2")
    req = protocol.parse_request(body, service)
    assert (req.id, req.op.name, req.args) == ("r1.2", name, args)
    reply = protocol.parse_reply(protocol.make_reply(req.id, {"x": [1, "two"]}))
    assert (reply.id, reply.ok, reply.result) == ("r1.2", True, {"x": [1, "two"]})


def test_error_reply_round_trip():
    err = FaasError(Code.NOT_FOUND, "no function fib", {"name": "fib"})
    reply = protocol.parse_reply(protocol.make_error("r9", err))
    assert not reply.ok and reply.id == "r9"
    assert (reply.error.code, reply.error.message, reply.error.details) == (
        Code.NOT_FOUND, "no function fib", {"name": "fib"})


def test_every_code_has_an_exit_status():
    assert set(EXIT_STATUS) == set(Code)
    assert len(set(EXIT_STATUS.values())) == len(Code)
    assert 0 not in EXIT_STATUS.values()


MALFORMED = {
    "wrong version": (msgpack.packb(envelope(v=2)), Code.VERSION_MISMATCH),
    "version as bool": (msgpack.packb(envelope(v=True)), Code.VERSION_MISMATCH),
    "missing version": (msgpack.packb({"id": "a", "op": "ping", "args": {}}),
                        Code.VERSION_MISMATCH),
    "unknown op": (msgpack.packb(envelope(op="run_ip")), Code.BAD_REQUEST),
    "op of another service": (msgpack.packb(envelope(op="status")), Code.BAD_REQUEST),
    "op not a string": (msgpack.packb(envelope(op=["ping"])), Code.BAD_REQUEST),
    "missing args": (msgpack.packb({"v": 1, "id": "a", "op": "ping"}), Code.BAD_REQUEST),
    "extra envelope field": (msgpack.packb(envelope(user="root")), Code.BAD_REQUEST),
    "extra arg": (msgpack.packb(envelope(args={"argv": ["ip"]})), Code.BAD_REQUEST),
    "missing field": (msgpack.packb(envelope(op="sync", args={"state": {}})), Code.BAD_REQUEST),
    "wrong type": (msgpack.packb(envelope(op="sync", args={"generation": "1", "state": {}})),
                   Code.BAD_REQUEST),
    "bool for int": (msgpack.packb(envelope(op="sync", args={"generation": True, "state": {}})),
                     Code.BAD_REQUEST),
    "negative int": (msgpack.packb(envelope(op="sync", args={"generation": -1, "state": {}})),
                     Code.BAD_REQUEST),
    "extra nested field": (msgpack.packb(envelope(op="sync", args={
        "generation": 1, "state": {"routes": []}})), Code.BAD_REQUEST),
    "peer key not 32 bytes": (msgpack.packb(envelope(op="sync", args={
        "generation": 1, "state": {"peers": [{"public_key": "A" * 42 + "==",
                                              "address": "fd00:faa5:0:100::2"}]}})),
        Code.BAD_REQUEST),
    "peer key not canonical": (msgpack.packb(envelope(op="sync", args={
        "generation": 1, "state": {"peers": [{"public_key": "A" * 42 + "B=",
                                              "address": "fd00:faa5:0:100::2"}]}})),
        Code.BAD_REQUEST),
    "address with a scope": (msgpack.packb(envelope(op="sync", args={
        "generation": 1, "state": {"addresses": ["fd00:faa5:1::a%wg0\n"]}})),
        Code.BAD_REQUEST),
    "chunk over the cap": (msgpack.packb(envelope(op="upload_chunk", args={
        "upload": "f" * 32, "offset": 0, "data": b"x" * (protocol.CHUNK_SIZE + 1)})),
        Code.BAD_REQUEST),
    "bad id": (msgpack.packb(envelope(id="../../x")), Code.BAD_REQUEST),
    "missing id": (msgpack.packb({"v": 1, "op": "ping", "args": {}}), Code.BAD_REQUEST),
    "not a map": (msgpack.packb([1, "a", "ping", {}]), Code.BAD_REQUEST),
    "garbage bytes": (b"\xc1\xff\x00garbage", Code.BAD_REQUEST),
    "empty frame": (b"", Code.BAD_REQUEST),
    "trailing bytes": (msgpack.packb(envelope()) + b"\x01", Code.BAD_REQUEST),
    "ext type": (msgpack.packb(envelope(args=msgpack.ExtType(1, b"x"))), Code.BAD_REQUEST),
    "oversize frame": (b"\x00" * (protocol.MAX_FRAME + 1), Code.TOO_LARGE),
}


def deep(n: int):
    value: object = {}
    for _ in range(n):
        value = [value]
    return value


MALFORMED["deep nesting"] = (msgpack.packb(envelope(args=deep(100))), Code.BAD_REQUEST)
MALFORMED["very deep nesting"] = (b"\x91" * 5000 + b"\xc0", Code.BAD_REQUEST)
MALFORMED["int map key"] = (msgpack.packb({1: "a", "v": 1}, strict_types=False), Code.BAD_REQUEST)
MALFORMED["bytes map key"] = (msgpack.packb({b"v": 1, "id": "a", "op": "ping", "args": {}}),
                              Code.BAD_REQUEST)
MALFORMED["nested int map key"] = (msgpack.packb(envelope(args={1: 2})), Code.BAD_REQUEST)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_is_refused_with_its_code(case):
    body, code = MALFORMED[case]
    assert refuse(body).code is code


def test_refusal_keeps_a_usable_request_id():
    err = refuse(msgpack.packb(envelope(id="req7", op="nope")))
    assert err.request_id == "req7"
    assert refuse(b"\xc1").request_id is None


def test_error_from_wire_with_unknown_code_is_internal():
    err = FaasError.from_wire({"code": "explode", "message": "x"})
    assert err.code is Code.INTERNAL
    assert FaasError.from_wire("nonsense").code is Code.INTERNAL


def test_reply_with_other_version_is_refused():
    reply = protocol.parse_reply(msgpack.packb({"v": 9, "id": "a", "ok": True, "result": 1}))
    assert not reply.ok and reply.error.code is Code.VERSION_MISMATCH


@pytest.mark.parametrize("field,good,bad", [
    (Str(max_len=3), "abc", "abcd"),
    (Str(choices=("a", "b")), "a", "c"),
    (Str(pattern=r"[a-z]+"), "abc", "ab1"),
    (Str(), "x", "a\x00b"),
    (Int(min=1, max=5), 5, 6),
    (Float(max=1.0), 1, float("nan")),
    (Bool(), False, 0),
    (Bytes(max_len=2), b"ab", "ab"),
    (IPv6(), "fd00::1", "10.0.0.1"),
    (List(item=Int(), max_items=2), [1, 2], [1, 2, 3]),
    (List(item=Int()), [1], [1, "2"]),
    (MapOf(key=Str(pattern=r"[A-Z]+"), value=Str()), {"A": "b"}, {"a": "b"}),
    (Record(fields={"a": Int()}), {"a": 1}, {"a": 1, "b": 2}),
    (Record(fields={"a": Int()}), {"a": 1}, {}),
])
def test_schema_fields(field, good, bad):
    field.check(good, "f")
    with pytest.raises(FaasError) as info:
        field.check(bad, "f")
    assert info.value.code is Code.BAD_REQUEST
    assert info.value.details["field"].startswith("f")


def test_optional_fields_get_their_default():
    rec = Record(fields={"a": Int(required=False, default=4), "b": Str(required=False)})
    assert rec.check({}, "") == {"a": 4, "b": None}


def test_ipv6_is_normalised():
    assert IPv6().check("FD00:0::0:1", "a") == "fd00::1"


@pytest.mark.parametrize("name", ["", "-fib", "fib-", "Fib", "f_b", "ns", "_functions",
                                  "a" * 64, "fib.faas", "fib\n", "$INCLUDE", "é"])
def test_bad_function_names_are_refused(name):
    body = msgpack.packb(envelope(op="upload_begin", args={"name": name}))
    err = refuse(body, "controller")
    assert err.code is Code.BAD_REQUEST and err.details["field"] == "args.name"


@pytest.mark.parametrize("name", ["a", "fib", "my-fn-2", "0", "a" * 63])
def test_good_function_names_pass(name):
    req = protocol.parse_request(msgpack.packb(envelope(op="upload_begin", args={"name": name})),
                                 "controller")
    assert req.args == {"name": name, "tag": None}
