"""Opening and reading local checkpoints, checked against safetensors' own loader."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from storage import (
    DTYPES,
    CheckpointError,
    check_compatible,
    open_checkpoint,
    read_many,
)


def all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_listing_matches_safetensors(tiny_llamas, kind):
    path = tiny_llamas[kind]
    ck = open_checkpoint(str(path))
    want = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for name in s.keys():
                sl = s.get_slice(name)
                want[name] = (sl.get_dtype(), tuple(sl.get_shape()), f.name)
    assert {n: (t.dtype, t.shape, t.file) for n, t in ck.tensors.items()} == want
    assert set(ck.files) == {f.name for f in path.glob("*.safetensors")}
    for name, ident in ck.files.items():
        assert ident.size == (path / name).stat().st_size and ident.uri == str(path / name)
    assert ck.model_type == "llama" and ck.config["num_hidden_layers"] == 2
    assert ck.extra_files == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    tensors = all_tensors(path)
    assert ck.param_count == sum(t.numel() for t in tensors.values())
    assert {n: t.nbytes for n, t in ck.tensors.items()} == {n: t.numel() * t.element_size() for n, t in tensors.items()}
    # file order, then offset order within a file
    keys = [(t.file, t.start) for t in ck.tensors.values()]
    assert keys == sorted(keys)
    if kind == "sharded":
        assert len(ck.files) >= 3


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_read_tensor_equals_load_file(tiny_llamas, kind):
    ck = open_checkpoint(str(tiny_llamas[kind]))
    want = all_tensors(tiny_llamas[kind])
    for name in ck.tensors:
        assert same(ck.read_tensor(name), want[name]), name
    got = read_many([(ck, n) for n in want], max_workers=4)
    assert all(same(g, want[n]) for g, n in zip(got, want, strict=True))


def test_row_ranges(tiny_llamas):
    ck = open_checkpoint(str(tiny_llamas["single"]))
    want = all_tensors(tiny_llamas["single"])
    name = "model.embed_tokens.weight"
    for r0, r1 in [(0, 1), (5, 17), (0, 128), (127, 128), (3, 3)]:
        assert same(ck.read_tensor(name, rows=(r0, r1)), want[name][r0:r1])
    norm = "model.norm.weight"  # 1-D: rows are elements
    assert same(ck.read_tensor(norm, rows=(4, 9)), want[norm][4:9])
    names = [name, "lm_head.weight"]
    got = read_many([(ck, n) for n in names], rows=[(1, 2), None])
    assert same(got[0], want[name][1:2]) and same(got[1], want["lm_head.weight"])
    for bad in [(-1, 2), (2, 1), (0, 129)]:
        with pytest.raises(CheckpointError, match="out of range"):
            ck.read_tensor(name, rows=bad)
    with pytest.raises(CheckpointError, match="no tensor"):
        ck.read_tensor("nope")


def test_rows_read_into_a_given_buffer(tiny_llamas):
    """A stream reads every window into its own buffers: read_tensor(out=...) fills them in place."""
    ck = open_checkpoint(str(tiny_llamas["single"]))
    name = "model.embed_tokens.weight"
    want = all_tensors(tiny_llamas["single"])[name]
    buf = torch.full((10 * want.shape[1],), 7.0, dtype=want.dtype)
    for r0, r1 in [(0, 10), (118, 128), (5, 9)]:
        n = (r1 - r0) * want.shape[1]
        got = ck.read_tensor(name, rows=(r0, r1), out=buf[:n])
        assert got.data_ptr() == buf.data_ptr() and same(got, want[r0:r1])
    with pytest.raises(ValueError, match="into a buffer of"):
        ck.read_tensor(name, rows=(0, 10), out=buf[:5])



def test_read_many_fills_the_buffers_given(tiny_llamas):
    """A GPU unit reads each input into a pinned buffer of its own: read_many(outs=...) fills them."""
    ck = open_checkpoint(str(tiny_llamas["sharded"]))
    want = all_tensors(tiny_llamas["sharded"])
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    bufs = [torch.zeros_like(want[n]) for n in names]
    got = read_many([(ck, n) for n in names], outs=bufs, max_workers=3)
    for g, b, n in zip(got, bufs, names, strict=True):
        assert g.data_ptr() == b.data_ptr() and same(g, want[n]), n
    with pytest.raises(ValueError, match="3 items to read, with 3 rows entries and 2 buffers"):
        read_many([(ck, n) for n in names], outs=bufs[:2])

def test_every_dtype_torch_has(tmp_path):
    torch.manual_seed(0)
    tensors = {}
    for code, dtype in DTYPES.items():
        raw = torch.randint(0, 256, (3, 5 * dtype.itemsize), dtype=torch.uint8)
        tensors[f"t.{code}"] = raw.view(dtype)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.float16)
    saveable = {}
    for name, t in tensors.items():  # safetensors' writer lacks a few codes torch has
        try:
            save_file({name: t}, tmp_path / "probe.safetensors")
            saveable[name] = t
        except Exception:
            pass
    assert {"t.BF16", "t.F8_E4M3", "t.F8_E5M2", "t.U64", "t.BOOL", "t.C64"} <= set(saveable)
    save_file(saveable, tmp_path / "model.safetensors")
    os.remove(tmp_path / "probe.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ck = open_checkpoint(str(tmp_path))
    want = load_file(tmp_path / "model.safetensors")
    assert ck.model_type is None
    for name in saveable:
        got = ck.read_tensor(name)
        assert same(got, want[name]) and got.dtype == ck.tensors[name].torch_dtype, name


def test_identity_is_stable_and_tracks_changes(tiny_llamas, tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(tiny_llamas["single"], path)
    a, b = open_checkpoint(str(path)), open_checkpoint(str(path) + "/")
    assert a.identity == b.identity and len(a.identity) == 64
    assert a.files["model.safetensors"].as_dict()["size"] == (path / "model.safetensors").stat().st_size
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] += 1
    time.sleep(0.01)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert open_checkpoint(str(path)).identity != a.identity
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        a.read_tensor("lm_head.weight")


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_a_new_identity(tiny_llamas, tmp_path):
    """cp -p, rsync -a and tar x keep the mtime: a resume must not reuse layers merged from the
    old bytes, nor read the new bytes under the old identity."""
    path = tmp_path / "ck"
    shutil.copytree(tiny_llamas["single"], path)
    weights = path / "model.safetensors"
    before = open_checkpoint(str(path))
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF   # one byte of the last tensor, same size
    with open(weights, "r+b") as f:  # in place: the same inode
        f.write(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_ino == st.st_ino
    assert open_checkpoint(str(path)).identity != before.identity
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        before.read_tensor("lm_head.weight")


def test_read_bytes(tiny_llamas):
    ck = open_checkpoint(str(tiny_llamas["single"]))
    assert ck.read_bytes("tokenizer.json") == (tiny_llamas["single"] / "tokenizer.json").read_bytes()
    with pytest.raises(CheckpointError):
        ck.read_bytes("../sharded/config.json")
    with pytest.raises(CheckpointError, match="no file"):
        ck.read_bytes("vocab.txt")


# --- compatibility ----------------------------------------------------------------------------


def test_compatible_inputs_report_dtype_differences(tiny_llamas):
    single, sharded, expert = (open_checkpoint(str(tiny_llamas[k])) for k in ("single", "sharded", "expert"))
    assert check_compatible([single, expert]) == []
    notes = check_compatible([single, expert, sharded])
    assert len(notes) == 1 and "input 2" in notes[0] and "F32" in notes[0] and "BF16" in notes[0]


def test_a_tie_word_embeddings_difference_is_a_note(tiny_llamas, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(tiny_llamas["expert"], tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": not cfg.get("tie_word_embeddings")}))
    [note] = check_compatible([open_checkpoint(str(tiny_llamas["expert"])), open_checkpoint(str(tied))])
    assert "input 1" in note and "tie_word_embeddings" in note


def test_incompatible_inputs_list_differences(tiny_llamas, tmp_path):
    single, other = open_checkpoint(str(tiny_llamas["single"])), open_checkpoint(str(tiny_llamas["other"]))
    with pytest.raises(CheckpointError) as e:
        check_compatible([single, single, other])
    msg = str(e.value)
    assert "input 2" in msg and str(tiny_llamas["other"]) in msg and "input 1" not in msg
    assert "'lm_head.weight' has shape (128, 16), input 0 has (128, 32)" in msg
    # 12 shapes differ (layer 0 + embeddings, norm, head), 9 tensors of layer 1 are missing: list the first 10
    assert "21 differences" in msg and "... and 11 more" in msg and msg.count("\n  input 2") == 10
    with pytest.raises(CheckpointError) as e:
        check_compatible([single, other], max_listed=100)
    assert str(e.value).count("missing tensor 'model.layers.1.") == 9

    renamed = tmp_path / "mistral"
    shutil.copytree(tiny_llamas["expert"], renamed)
    cfg = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model_type 'mistral', input 0 has 'llama'"):
        check_compatible([single, open_checkpoint(str(renamed))])


# --- refusing bad input -----------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('BOOM_FILE', '/tmp/mergeline-unpickled')}",))


def test_pickle_weights_are_refused_never_unpickled(tmp_path, tiny_llamas, monkeypatch):
    sentinel = tmp_path / "unpickled"
    monkeypatch.setenv("BOOM_FILE", str(sentinel))
    ck = tmp_path / "pickled"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "llama"}')
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        (ck / name).write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="only safetensors") as e:
        open_checkpoint(str(ck))
    assert "pytorch_model.bin" in str(e.value)
    assert not sentinel.exists()

    both = tmp_path / "both"
    shutil.copytree(tiny_llamas["single"], both)
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    assert len(open_checkpoint(str(both)).tensors) == len(load_file(both / "model.safetensors"))
    assert not sentinel.exists()


def raw_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, length, message", [
    ({"a": F32x2}, b"\0" * 8, 100_000_001, "exceeds the 100000000-byte limit"),
    ({"a": F32x2}, b"\0" * 8, 10_000, "shorter than its 10000-byte header"),
    ({"a": {**F32x2, "data_offsets": [0, 400]}, "b": F32x2}, b"\0" * 8, None, "outside the file"),
    ({"a": F32x2}, b"\0" * 4, None, "outside the file"),  # data cut short
    ({"a": {**F32x2, "shape": [4], "data_offsets": [0, 16]}, "b": {**F32x2, "data_offsets": [8, 16]}},
     b"\0" * 16, None, "overlap"),
    ({"a": {**F32x2, "shape": [3]}}, b"\0" * 8, None, "do not hold shape"),
    ({"a": {**F32x2, "dtype": "F4"}}, b"\0" * 8, None, "dtype 'F4'"),
    ({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8, None, "shape"),
    ({"a": {**F32x2, "shape": [2.0]}}, b"\0" * 8, None, "shape"),
    ({"a": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, None, "data_offsets"),
    ({"a": {**F32x2, "data_offsets": [0]}}, b"\0" * 8, None, "data_offsets"),
    ({"a": [1, 2]}, b"", None, "malformed"),
    ({"__metadata__": {"x": 1}}, b"", None, "__metadata__"),
    (b"{not json", b"", None, "not valid JSON"),
    (b'["a"]', b"", None, "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {}}', b"", None, "duplicate key 'a'"),
    (b"\xff\xfe", b"", None, "not valid JSON"),
])
def test_malformed_headers_are_refused(tmp_path, header, data, length, message):
    (tmp_path / "config.json").write_text("{}")
    raw_file(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_tiny_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\1\0\0")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(str(tmp_path))


def test_gaps_between_tensors_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    data = struct.pack("<2f", 1, 2) + b"junk" + struct.pack("<2f", 3, 4)
    raw_file(tmp_path / "model.safetensors", {"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, data)
    ck = open_checkpoint(str(tmp_path))
    assert ck.read_tensor("b").tolist() == [3.0, 4.0]


def mapped_files(t: torch.Tensor) -> set[str]:
    """The files whose mappings in this process hold t's first byte."""
    addr, found = t.data_ptr(), set()
    for line in open("/proc/self/maps"):
        span, _, _, _, _, *path = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi and path and path[0].startswith("/"):
            found.add(path[0])
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_large_local_tensors_are_mapped_not_copied(tmp_path):
    """Reading a large tensor maps the file's pages (no copy into fresh memory); the result has the
    file's bytes, writing to it never changes the file, and a range the mapping would need to start
    unaligned is read instead."""
    big = torch.randn(1024, 513)  # 2.1 MB of float32: mapped
    (tmp_path / "config.json").write_text("{}")
    save_file({"big": big, "small": torch.arange(6.0)}, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    ck = open_checkpoint(str(tmp_path))
    got = ck.read_tensor("big")
    assert same(got, big) and mapped_files(got) == {str(tmp_path / "model.safetensors")}
    assert mapped_files(ck.read_tensor("small")) == set()  # small reads are copied
    got.mul_(2)  # copy-on-write
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert same(ck.read_tensor("big"), big)

    # a tensor whose data starts at an odd offset in the file (legal, if unusual) is read, not mapped
    odd = torch.randn(600_000).to(torch.bfloat16)
    data = b"\0" + odd.view(torch.uint8).numpy().tobytes()
    header = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "odd": {"dtype": "BF16", "shape": [600_000], "data_offsets": [1, len(data)]}}
    h = json.dumps(header).encode()
    raw_file(tmp_path / "model.safetensors", h + b" " * (-len(h) % 8), data)
    ck = open_checkpoint(str(tmp_path))
    assert ck.tensors["odd"].start % 2 == 1
    got = ck.read_tensor("odd")
    assert same(got, odd) and mapped_files(got) == set()


def test_a_file_changed_after_opening_is_refused_before_it_is_mapped(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"big": torch.randn(1024, 512)}, tmp_path / "model.safetensors")
    ck = open_checkpoint(str(tmp_path))
    time.sleep(0.01)
    save_file({"big": torch.randn(512, 512)}, tmp_path / "model.safetensors")  # shorter: mapping it would SIGBUS
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        ck.read_tensor("big")


def sharded_copy(tiny_llamas, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(tiny_llamas["sharded"], path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


def write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_problems_are_refused(tiny_llamas, tmp_path):
    path, index = sharded_copy(tiny_llamas, tmp_path)
    wm = index["weight_map"]
    name, shard = next(iter(wm.items()))
    other_shard = next(s for s in wm.values() if s != shard)
    cases = [
        ({**wm, name: "../sharded/" + shard}, "refusing file name"),
        ({**wm, name: "missing-00009.safetensors"}, "which is missing"),
        ({**wm, name: "config.json"}, "not a .safetensors"),
        ({**wm, name: other_shard}, "not mapped to this shard"),
        ({**wm, "ghost.weight": shard}, "in no shard's header"),
        ({}, "no weight_map"),
    ]
    for weight_map, message in cases:
        write_index(path, {**index, "weight_map": weight_map})
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(str(path))


def test_tensor_in_two_shards_is_refused(tiny_llamas, tmp_path):
    path, index = sharded_copy(tiny_llamas, tmp_path)
    save_file({"model.norm.weight": torch.ones(32)}, path / "extra.safetensors")  # also in a model-* shard
    index["weight_map"]["model.norm.weight"] = "extra.safetensors"
    write_index(path, index)
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in both extra.safetensors and model-"):
        open_checkpoint(str(path))


def test_missing_pieces_are_refused(tiny_llamas, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        open_checkpoint(str(tmp_path / "nothing"))
    path = tmp_path / "noconfig"
    shutil.copytree(tiny_llamas["single"], path)
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(str(path))
    (path / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="JSON object"):
        open_checkpoint(str(path))
    os.remove(path / "model.safetensors")
    save_file({"x": torch.ones(1)}, path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not an HF model layout"):
        open_checkpoint(str(path))


def test_half_published_mergeline_output_is_incomplete(tiny_llamas, tmp_path):
    path = tmp_path / "out"
    shutil.copytree(tiny_llamas["single"], path)
    open_checkpoint(str(path))  # a plain HF directory needs no marker
    (path / "mergeline.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(str(path))
    size = (path / "model.safetensors").stat().st_size
    (path / "_MERGELINE_COMPLETE").write_text(json.dumps({"files": {"model.safetensors": size + 1}}))
    with pytest.raises(CheckpointError, match="does not match the completion marker"):
        open_checkpoint(str(path))
    (path / "_MERGELINE_COMPLETE").write_text(json.dumps({"files": {"model.safetensors": size}}))
    assert open_checkpoint(str(path)).tensors
