"""Property-based fuzzing of the safetensors header validator against the reference loader.

Hypothesis builds headers that are mostly almost-right (valid layouts, then one mutation: a
shifted or swapped offset, a wrong shape, an odd dtype, duplicate or odd keys, trailing or
missing bytes, a flipped or cut header byte). `read_header` must accept exactly the files
`safetensors.safe_open` reads in full, except where deltalens is stricter on purpose
(POLICY below). DELTALENS_HEADER_FUZZ_EXAMPLES raises the count (`make reliability` runs 100 000);
figures go to test-output/reliability/header_fuzz.json.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from deltalens.worker.errors import InputError
from deltalens.worker.safetensors_header import DTYPE_SIZES, MAX_NAME_LENGTH, UNSAFE_NAME, read_header

EXAMPLES = int(os.environ.get("DELTALENS_HEADER_FUZZ_EXAMPLES", "1000"))
FIGURES = Path(__file__).resolve().parents[1] / "test-output" / "reliability"
COUNTS = {"cases": 0, "accepted": 0, "rejected": 0, "policy_rejected": 0, "disagreements": 0}

names = st.one_of(
    st.sampled_from(["w", "b", "model.layers.0.q_proj.weight", "lm_head.weight", "a", "z"]),
    st.text(min_size=0, max_size=12),
    st.sampled_from(["../x", "<b>", "a\x00b", "x" * (MAX_NAME_LENGTH + 1), "__metadata__"]),
)
dtypes = st.one_of(
    st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["F13", "f32", "", "BF16 ", "Q4"]), st.integers()
)
shapes = st.lists(st.integers(0, 5), max_size=3)


@st.composite
def files(draw) -> bytes:
    """A whole .safetensors file as bytes."""
    entries, offset = {}, 0
    for name in draw(st.lists(names, max_size=4)):
        dtype, shape = draw(dtypes), draw(shapes)
        size = math.prod(shape) * DTYPE_SIZES.get(dtype, 1) if isinstance(dtype, str) else 1
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if entries and draw(st.booleans()):  # one structural mutation
        name = draw(st.sampled_from(sorted(entries)))
        entry = entries[name]
        what = draw(
            st.sampled_from(
                ["shift", "grow", "swap", "shape", "offsets_type", "drop_key", "not_object", "bool_dim"]
            )
        )
        if what == "shift":
            delta = draw(st.integers(-3, 3))
            entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
        elif what == "grow":
            entry["data_offsets"][1] += draw(st.integers(-2, 2))
        elif what == "swap":
            entry["data_offsets"].reverse()
        elif what == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 5), max_size=3))
        elif what == "offsets_type":
            entry["data_offsets"] = draw(st.sampled_from([[0], [0, 1, 2], ["0", "4"], [0.0, 4.0], None]))
        elif what == "drop_key":
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif what == "not_object":
            entries[name] = draw(st.sampled_from([[], "x", 1, None]))
        elif what == "bool_dim":
            entry["shape"] = [True]
    if draw(st.booleans()):
        entries["__metadata__"] = draw(
            st.one_of(
                st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=1),
                st.sampled_from([None, [], "x"]),
            )
        )
    header = json.dumps(entries).encode()
    if draw(st.integers(0, 9)) == 0:  # duplicate a key at the text level
        header = (
            header[:-1] + b', "w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}'
            if len(header) > 2
            else header
        )
    header += b" " * draw(st.integers(0, 7))  # the reference writer pads to 8 bytes
    if draw(st.integers(0, 9)) == 0:  # byte-level damage
        cut = draw(st.integers(0, max(len(header) - 1, 0)))
        header = header[:cut] + bytes([draw(st.integers(0, 255))]) + header[cut + 1 :]
    data = bytes(draw(st.integers(0, 255)) for _ in range(min(offset, 64))) + bytes(max(offset - 64, 0))
    data = data[: max(len(data) + draw(st.sampled_from([0, 0, 0, -1, 1, 4])), 0)]
    declared = len(header) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 1000, 1 << 40]))
    return struct.pack("<Q", max(declared, 0)) + header + data


def reference_reads(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # SafetensorError and friends: refused
        return False


def policy_refuses(path: Path) -> bool:
    """Files deltalens refuses on purpose though the reference reads them: duplicate keys (the
    reference keeps the last one — two readers could see two different models) and tensor names
    that are too long or look like markup / paths / control characters (safetensors_header.py)."""
    try:
        raw = path.read_bytes()
        keys = [
            k for k, _ in json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]], object_pairs_hook=list)
        ]
    except Exception:  # not a JSON object: nothing policy-specific to refuse
        return False
    return len(set(keys)) < len(keys) or any(
        len(k) > MAX_NAME_LENGTH or UNSAFE_NAME.search(k) for k in keys if k != "__metadata__"
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(content=files())
def test_validator_agrees_with_the_reference_loader(tmp_path, content):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    try:
        read_header(path)
        ours = True
    except InputError:
        ours = False
    theirs = reference_reads(path)
    policy = theirs and not ours and policy_refuses(path)
    COUNTS["cases"] += 1
    COUNTS["accepted" if ours else "policy_rejected" if policy else "rejected"] += 1
    if ours != theirs and not policy:
        COUNTS["disagreements"] += 1
    assert ours == theirs or policy, (
        f"read_header {'accepts' if ours else 'refuses'} what safe_open "
        f"{'refuses' if ours else 'reads'}: {content[:300]!r}"
    )


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / "header_fuzz.json").write_text(json.dumps(COUNTS, indent=1))
