"""A corpus of malformed and hostile checkpoints, each with the one-line problem it must be
refused with. Used by the tests (engine, CLI, upload API, register-by-path) and runnable:

    python tests/hostile.py OUT     # writes every case under OUT/<case>/ and lists them
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

F32 = {"dtype": "F32"}


def raw_safetensors(
    path: Path, header: str | bytes, data: bytes = b"", header_len: int | None = None
) -> Path:
    body = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)
    return path


def tensor_header(**entries) -> str:
    return json.dumps(
        {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()}
    )


def named(name: str) -> Callable[[Path], Path]:
    return lambda p: raw_safetensors(
        p, json.dumps({name: {**F32, "shape": [1], "data_offsets": [0, 4]}}), bytes(4)
    )


def header_of_size(size: int) -> Callable[[Path], Path]:
    """A real header of `size` bytes (a valid tensor plus padding metadata)."""

    def make(p: Path) -> Path:
        head = json.dumps({"w": {**F32, "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"pad": ""}})
        pad = size - len(head)
        return raw_safetensors(p, head.replace('"pad": ""', '"pad": "' + "x" * pad + '"'), bytes(4))

    return make


def many_tensors(count: int) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        return raw_safetensors(
            p, json.dumps({f"t{i}": {**F32, "shape": [0], "data_offsets": [0, 0]} for i in range(count)})
        )

    return make


def deeply_nested(depth: int) -> Callable[[Path], Path]:
    return lambda p: raw_safetensors(p, '{"w": ' + "[" * depth + "]" * depth + "}")


def nonfinite_target(p: Path) -> Path:
    from safetensors.numpy import save_file

    w = np.ones((4, 4), np.float32)
    w[0, 0], w[1, 1] = np.nan, np.inf
    save_file({"w": w}, str(p))
    return p


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def legacy_pickle(p: Path) -> Path:
    import torch

    p.write_bytes(pickle.dumps({"w": torch.zeros(2), "x": Evil(p.parent / "PWNED")}))
    return p


def zip_pickle(p: Path) -> Path:
    import torch

    torch.save({"w": torch.zeros(2), "x": Evil(p.parent / "PWNED")}, p)
    return p


def sharded(weight_map: dict[str, str], shards: dict[str, dict]) -> Callable[[Path], Path]:
    """A folder with an index and the given shards ({file: {tensor: numpy array}})."""

    def make(folder: Path) -> Path:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        for file, tensors in shards.items():
            save_file(tensors, str(folder / file))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        return folder

    return make


ONE = {"a": np.zeros(2, np.float32)}
TWO = {"b": np.zeros(2, np.float32)}


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]  # gets <dir>/model.safetensors (or .bin, or a folder) and writes it
    problem: str  # substring of the one-line refusal
    file: str = "model.safetensors"
    folder: bool = False  # make builds a whole checkpoint folder
    status: int = 422  # upload API answer
    values: bool = False  # well-formed file whose *values* are refused (by the analysis)
    pickle: bool = False

    def build(self, root: Path) -> Path:
        """Write this case under root/<name>/; returns the checkpoint path (file or folder)."""
        where = root / self.name
        where.mkdir(parents=True, exist_ok=True)
        return self.make(where / "ckpt") if self.folder else self.make(where / self.file)


CASES = [
    # the engine issue's malformed safetensors
    Case("too_short", lambda p: (p.write_bytes(b"\x01\x02\x03"), p)[1], "too short"),
    Case(
        "header_beyond_file",
        lambda p: raw_safetensors(p, "{}", header_len=10_000),
        "beyond the end of the file",
    ),
    Case("not_json", lambda p: raw_safetensors(p, "{this is not json}"), "not valid JSON"),
    Case("not_utf8", lambda p: raw_safetensors(p, b"\xff\xfe{}"), "not UTF-8"),
    Case("not_an_object", lambda p: raw_safetensors(p, "[1, 2]"), "not an object"),
    Case("metadata_not_strings", lambda p: raw_safetensors(p, '{"__metadata__": {"a": 1}}'), "__metadata__"),
    Case(
        "duplicate_keys",
        lambda p: raw_safetensors(
            p,
            '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            bytes(8),
        ),
        "duplicate key 'w'",
    ),
    Case(
        "unknown_dtype",
        lambda p: raw_safetensors(p, tensor_header(w=("F13", [2], [0, 4])), bytes(4)),
        "unknown dtype 'F13'",
    ),
    Case(
        "shape_bytes_mismatch",
        lambda p: raw_safetensors(p, tensor_header(w=("F32", [3], [0, 8])), bytes(8)),
        "needs 12 bytes",
    ),
    Case(
        "offsets_out_of_bounds",
        lambda p: raw_safetensors(p, tensor_header(w=("F32", [4], [0, 16])), bytes(8)),
        "out of bounds",
    ),
    Case(
        "overlapping",
        lambda p: raw_safetensors(
            p, tensor_header(a=("F32", [2], [0, 8]), b=("F32", [2], [4, 12])), bytes(12)
        ),
        "overlap",
    ),
    Case(
        "hole",
        lambda p: raw_safetensors(p, tensor_header(a=("F32", [1], [4, 8])), bytes(8)),
        "unindexed bytes",
    ),
    Case(
        "trailing",
        lambda p: raw_safetensors(p, tensor_header(a=("F32", [1], [0, 4])), bytes(12)),
        "trailing bytes",
    ),
    Case(
        "bad_shape",
        lambda p: raw_safetensors(p, tensor_header(a=("F32", [-1], [0, 4])), bytes(4)),
        "non-negative integers",
    ),
    Case(
        "truncated",
        lambda p: raw_safetensors(p, tensor_header(w=("F32", [64], [0, 256])), bytes(156)),
        "out of bounds",
    ),
    # this additions
    Case("header_100mb", header_of_size(100_000_001), "exceeds the limit"),
    Case("deeply_nested", deeply_nested(200_000), "nested too deeply"),
    Case("huge_tensor_count", many_tensors(100_001), "exceed the limit"),
    Case("name_10000_chars", named("w" * 10_000), "longer than 1024"),
    Case("name_path_traversal", named("../../etc/passwd"), "'..' segment"),
    Case("name_html_script", named('<script>alert("x")</script>'), "markup"),
    Case(
        "zero_size_inside_another",
        lambda p: raw_safetensors(p, tensor_header(a=("F32", [2], [0, 8]), z=("F32", [0], [4, 4])), bytes(8)),
        "overlap",
    ),
    Case(
        "index_missing_shard",
        sharded(
            {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}, {"model-00001.safetensors": ONE}
        ),
        "is missing",
        folder=True,
    ),
    Case(
        "index_wrong_shard",
        sharded(
            {"a": "model-00001.safetensors", "b": "model-00001.safetensors"},
            {"model-00001.safetensors": ONE, "model-00002.safetensors": TWO},
        ),
        "does not hold it",
        folder=True,
    ),
    Case(
        "index_escapes_folder",
        sharded({"a": "../model-00001.safetensors"}, {"model-00001.safetensors": ONE}),
        "leaves the checkpoint folder",
        folder=True,
    ),
    Case("nan_and_inf_values", nonfinite_target, "holds 1 NaN and 1 infinite values", values=True),
    Case(
        "pickle_runs_code",
        legacy_pickle,
        "refused to unpickle",
        file="pytorch_model.bin",
        status=415,
        pickle=True,
    ),
    Case(
        "bin_zip_malicious_data_pkl",
        zip_pickle,
        "refused to unpickle",
        file="pytorch_model.bin",
        status=415,
        pickle=True,
    ),
]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for case in CASES:
        print(f"{case.name:28} {case.build(out)}  -> {case.problem}")
