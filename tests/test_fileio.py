"""uvit.fileio: hashes against hashlib, directory-hash sensitivity, atomic writes that never leave a
partial target or a temporary behind."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

from uvit import fileio


def test_sha256_file_equals_hashlib_over_the_bytes(tmp_path, monkeypatch):
    data = random.Random(0).randbytes(3 * 1000 + 7)
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    monkeypatch.setattr(fileio, "BLOCK", 1000)  # several blocks, the last one short
    assert fileio.sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (root / "a-c").write_bytes(b"dash")  # sorts after a/... by components, before it as a string


def test_sha256_dir_is_the_listing_of_relative_paths_and_file_hashes(tmp_path):
    _tree(tmp_path / "d")
    expected = hashlib.sha256()
    for rel, data in [("a-c", b"dash"), ("a.txt", b"alpha"), ("sub/b.bin", b"\x00\x01")]:
        expected.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\0")
    assert fileio.sha256_dir(tmp_path / "d") == expected.hexdigest()
    assert (
        fileio.sha256_listing(tmp_path / "d", ["a.txt"])
        == hashlib.sha256(b"a.txt\0" + hashlib.sha256(b"alpha").hexdigest().encode() + b"\0").hexdigest()
    )


def test_sha256_dir_changes_on_rename_and_edit_not_on_mtime(tmp_path):
    d = tmp_path / "d"
    _tree(d)
    h0 = fileio.sha256_dir(d)
    os.utime(d / "a.txt", (1, 1))
    assert fileio.sha256_dir(d) == h0
    (d / "a.txt").rename(d / "z.txt")
    h1 = fileio.sha256_dir(d)
    assert h1 != h0
    (d / "z.txt").rename(d / "a.txt")
    assert fileio.sha256_dir(d) == h0
    (d / "sub" / "b.bin").write_bytes(b"\x00\x02")
    assert fileio.sha256_dir(d) not in (h0, h1)


def test_sha256_state_dict_hashes_names_dtypes_shapes_and_bytes():
    sd = {"b.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.tensor([1], dtype=torch.int64)}
    expected = hashlib.sha256()
    for name in ("a.bias", "b.w"):
        t = sd[name]
        expected.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + t.numpy().tobytes())
    assert fileio.sha256_state_dict(sd) == expected.hexdigest()
    only_b = hashlib.sha256(b"b.w|torch.float32|(2, 3)|" + sd["b.w"].numpy().tobytes()).hexdigest()
    assert fileio.sha256_state_dict(sd, prefixes=("b.",)) == only_b
    # Same bytes, another shape: a different hash.
    assert fileio.sha256_state_dict({**sd, "b.w": sd["b.w"].reshape(3, 2)}) != fileio.sha256_state_dict(sd)
    # Non-contiguous views hash as their values.
    assert fileio.sha256_state_dict({"b.w": sd["b.w"].t().contiguous().t()}, ("b.",)) == only_b


def test_write_json_round_trip_and_no_temporary_left(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "é"}}
    p = fileio.write_json(tmp_path / "deep" / "m.json", obj, sort_keys=True)
    assert json.loads(p.read_text()) == obj
    assert p.read_text() == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["m.json"]


def test_write_bytes_text_npy_npz(tmp_path):
    assert fileio.write_bytes(tmp_path / "b", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert fileio.write_text(tmp_path / "t", "héllo\n").read_bytes() == "héllo\n".encode()
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    p = fileio.write_npz(tmp_path / "s.npz", arr_0=a, labels=np.array([1, 2, 3]))
    with np.load(p) as f:
        assert f["arr_0"].tolist() == a.tolist() and f["labels"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(np.load(fileio.write_npy(tmp_path / "x.npy", a.T)), a.T)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b", "s.npz", "t", "x.npy"]


def test_a_write_that_raises_midway_leaves_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with fileio.atomic_open(target, "w") as f:
            f.write("half of the new conte")
            f.flush()
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]
    # Not JSON-serialisable: raises, nothing written (no target, no temporary).
    with pytest.raises(TypeError):
        fileio.write_json(tmp_path / "new.json", {"x": object()})
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_temporaries_are_recognised_and_removed(tmp_path):
    (tmp_path / ".samples-00001.npz.tmp-0123abcd").write_bytes(b"partial")
    (tmp_path / ".other.json.tmp-77").write_bytes(b"partial")
    (tmp_path / "samples-00000.npz").write_bytes(b"done")
    assert fileio.is_temp_name(".samples-00001.npz.tmp-0123abcd") and not fileio.is_temp_name("samples-00000.npz")
    gone = fileio.remove_temps(tmp_path, "samples-*.npz")
    assert [p.name for p in gone] == [".samples-00001.npz.tmp-0123abcd"]
    assert sorted(x.name for x in tmp_path.iterdir()) == [".other.json.tmp-77", "samples-00000.npz"]


def test_atomic_open_refuses_append_and_read_modes(tmp_path):
    for mode in ("a", "r+", "ab"):
        with pytest.raises(ValueError):
            with fileio.atomic_open(tmp_path / "x", mode):
                pass


def test_temp_path_and_commit_file_put_a_memmap_written_in_place(tmp_path):
    final = tmp_path / "latents-00000.npy"
    tmp = fileio.temp_path(final)
    assert tmp.parent == tmp_path and fileio.is_temp_name(tmp.name) and tmp != fileio.temp_path(final)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(4, 2))
    arr[:] = np.arange(8).reshape(4, 2)
    arr.flush()
    del arr
    assert fileio.commit_file(tmp, final) == final and not tmp.exists()
    assert np.load(final).tolist() == np.arange(8, dtype=np.float16).reshape(4, 2).tolist()


def test_read_tree_and_write_tree_round_trip_with_the_marker_last(tmp_path, monkeypatch) -> None:
    import uvit.fileio as fileio

    src = tmp_path / "src"
    (src / "split").mkdir(parents=True)
    (src / "split" / "a.npy").write_bytes(b"\x00\x01")
    (src / "chunk-00000.json").write_text("{}")
    files = fileio.read_tree(src)
    assert files == {"chunk-00000.json": b"{}", "split/a.npy": b"\x00\x01"}
    order = []
    real = fileio.write_bytes
    monkeypatch.setattr(fileio, "write_bytes", lambda path, data: order.append(path.name) or real(path, data))
    written = fileio.write_tree(tmp_path / "dst", files, last=["chunk-00000.json"])
    assert order == ["a.npy", "chunk-00000.json"]  # the marker after the rest
    assert [p.relative_to(tmp_path / "dst").as_posix() for p in written] == ["split/a.npy", "chunk-00000.json"]
    assert fileio.read_tree(tmp_path / "dst") == files
