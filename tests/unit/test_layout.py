"""forecast/layout.py must say exactly what bpf/forecast.h says."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

from forecast import layout

HEADER = (Path(__file__).resolve().parents[2] / "bpf" / "forecast.h").read_text()
C_TYPES = {
    "__u32": ctypes.c_uint32,
    "__u64": ctypes.c_uint64,
    "__u16": ctypes.c_uint16,
    "__u8": ctypes.c_uint8,
}


def _defines() -> dict[str, int]:
    return {m[1]: int(m[2], 0) for m in re.finditer(r"#define (FC_\w+) (0x[0-9a-f]+|\d+)", HEADER)}


def _struct_fields(name: str) -> list[tuple[str, str, str]]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", HEADER, re.S)
    assert body, f"struct {name} not in forecast.h"
    fields = []
    for line in re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S).splitlines():
        m = re.match(r"\s*(struct \w+|\w+) (\w+)(?:\[(\w+)\])?;", line)
        if m:
            fields.append((m[1], m[2], m[3] or ""))
    return fields


def test_constants_match() -> None:
    d = _defines()
    assert d["FC_MAX_SAS"] == layout.FC_MAX_SAS == layout.FC_CHUNK * layout.FC_TAIL_CALLS
    assert d["FC_CHUNK"] == layout.FC_CHUNK
    assert d["FC_TAIL_CALLS"] == layout.FC_TAIL_CALLS
    assert d["FC_LIST_LAN"] == layout.FC_LIST_LAN
    assert d["FC_LIST_REINJECT"] == layout.FC_LIST_REINJECT
    assert d["FC_LISTS"] == layout.FC_LISTS
    assert d["FC_GENS"] == layout.FC_GENS
    assert d["FC_MAX_TS"] == layout.FC_MAX_TS
    assert d["FC_MAX_GROUPS"] == layout.FC_MAX_GROUPS
    assert d["FC_FAMILIES"] == layout.FC_FAMILIES
    for family in layout.Family:
        assert d[f"FC_FAMILY_{family.name}"] == family.value
        assert re.search(rf"#define FC_WALK_{family.name} FC_FAMILY_{family.name}\b", HEADER)
    assert d["FC_SA_ACTIVE"] == layout.FC_SA_ACTIVE
    assert d["FC_SA_REINJECT"] == layout.FC_SA_REINJECT
    assert d["FC_SA_LOCAL_OUT"] == layout.FC_SA_LOCAL_OUT
    assert d["FC_LOCAL_MAX_PACKET"] == layout.FC_LOCAL_MAX_PACKET
    assert d["FC_LOCAL_HEADER"] == layout.FC_LOCAL_HEADER == layout.FcLocalCopy.packet.offset
    copy = layout.FcLocalCopy(mark=0xC0FFEE, slot=7, len=1234, family=layout.Family.IPV4)
    header = bytes(copy)[: layout.FC_LOCAL_HEADER]
    assert layout.LOCAL_COPY_HEADER.unpack_from(header) == (0xC0FFEE, 7, 1234, layout.Family.IPV4)
    assert re.search(r"#define FC_LOCAL_RING_BYTES \(4 << 20\)", HEADER)
    assert layout.FC_LOCAL_RING_BYTES == 4 << 20
    assert d["FC_LOCAL_RESULTS"] == layout.FC_LOCAL_RESULTS
    for result in layout.LocalResult:
        assert d[f"FC_LOCAL_{result.name}"] == result.value
    # the verifier's bound: a power of two
    assert layout.FC_LOCAL_MAX_PACKET & layout.FC_LOCAL_MASK == 0
    assert d["FC_DIRS"] == layout.FC_DIRS
    assert d["FC_DROPS"] == layout.FC_DROPS
    assert d["FC_SA_DROPS"] == layout.FC_SA_DROPS
    assert layout.FC_BUCKET_LAN == layout.FC_MAX_SAS and layout.FC_BUCKETS == layout.FC_MAX_SAS + 1
    assert re.search(r"#define FC_BUCKET_LAN FC_MAX_SAS\b", HEADER)
    assert re.search(r"#define FC_BUCKETS \(FC_MAX_SAS \+ 1\)", HEADER)
    for direction in layout.Direction:
        assert d[f"FC_DIR_{direction.name}"] == direction.value
    for reason in layout.DropReason:
        assert d[f"FC_DROP_{reason.name}"] == reason.value
    for sa_reason in layout.SaDropReason:
        assert d[f"FC_SA_DROP_{sa_reason.name}"] == sa_reason.value
    # Every reason the header defines has its Python name (none forgotten on either side).
    assert {k for k in d if k.startswith("FC_DROP_")} == {
        f"FC_DROP_{r.name}" for r in layout.DropReason
    }
    assert {k for k in d if k.startswith("FC_SA_DROP_")} == {
        f"FC_SA_DROP_{r.name}" for r in layout.SaDropReason
    }


def test_structs_match_field_by_field() -> None:
    d = _defines()
    pairs = {
        "fc_ts": layout.FcTs,
        "fc_in6": layout.FcIn6,
        "fc_ts6": layout.FcTs6,
        "fc_sa": layout.FcSa,
        "fc_config": layout.FcConfig,
        "fc_counter": layout.FcCounter,
        "fc_rate": layout.FcRate,
        "fc_bucket": layout.FcBucket,
        "fc_local_copy": layout.FcLocalCopy,
    }
    for cname, pytype in pairs.items():
        c_fields = _struct_fields(cname)
        py_fields = pytype._fields_
        assert [f[1] for f in c_fields] == [f[0] for f in py_fields], cname
        for (ctype, fname, count), py_field in zip(c_fields, py_fields, strict=True):
            ptype: Any = py_field[1]
            if count:
                n = d.get(count) or int(count)
                assert ptype._length_ == n, f"{cname}.{fname}"
                ptype = ptype._type_
            if ctype.startswith("struct "):
                assert ptype is pairs[ctype.removeprefix("struct ")], f"{cname}.{fname}"
            else:
                assert ptype is C_TYPES[ctype], f"{cname}.{fname}"


def test_sizes_have_no_hidden_padding() -> None:
    assert ctypes.sizeof(layout.FcSa) == 16 + 8 * layout.FC_MAX_TS + 4 + 32 * layout.FC_MAX_TS
    ipv4 = 16 + 2 * 4 * layout.FC_MAX_GROUPS + 4 + 12 + 2 * 16
    ipv6 = 4 + (4 + 16) * layout.FC_MAX_GROUPS + 4
    assert ctypes.sizeof(layout.FcConfig) == ipv4 + ipv6
    assert ctypes.sizeof(layout.FcConfig) % 8 == 0


def test_be32_is_network_order_in_memory() -> None:
    assert bytes(ctypes.c_uint32(layout.be32("224.0.0.251"))) == bytes([224, 0, 0, 251])


def test_be128_is_network_order_in_memory() -> None:
    words = (ctypes.c_uint32 * 4)(*layout.be128("ff02::1:3"))
    assert bytes(words) == bytes([0xFF, 2] + [0] * 11 + [1, 0, 3])
