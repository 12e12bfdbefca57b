"""Sources read in place: NumPy .npy arrays and flat token files (nanoGPT / Megatron style),
made with NumPy as they are in the wild."""

from __future__ import annotations

from pathlib import Path

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import sluice

CLI = Path(__file__).resolve().parents[2] / "build" / "sluice"


def epoch(cfg: dict, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Every batch of an epoch, kept (fewer than max_batches_held)."""
    return list(sluice.Loader(cfg, rank=rank, world_size=world_size))


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8, np.float16])
@pytest.mark.parametrize("direct", [True, False])
def test_npy_samples_are_the_rows_with_their_dtype_and_shape(tmp_path: Path, dtype, direct) -> None:
    a = (np.random.default_rng(0).standard_normal((777, 3, 5)) * 50).astype(dtype)
    np.save(tmp_path / "a.npy", a)
    cfg = {"dataset": {"path": str(tmp_path / "a.npy")}, "batch_size": 32, "drop_last": False,
           "io": {"direct": direct}}
    seen = []
    for b in epoch(cfg):
        real = ~b["padding"]
        idx = b["index"][real]
        assert b["data"].dtype == torch.from_numpy(a[:1]).dtype
        assert b["data"].shape[1:] == (3, 5)
        assert torch.equal(b["data"][real], torch.from_numpy(a[idx.numpy()]))
        seen += idx.tolist()
    assert sorted(seen) == list(range(777))


def test_npy_exactly_once_across_ranks(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.int32).reshape(1000, 1))
    cfg = {"dataset": {"path": str(tmp_path / "a.npy"), "format": "npy"}, "batch_size": 10}
    seen = []
    for rank in range(4):
        for b in epoch(cfg, rank, 4):
            assert b["data"][:, 0].tolist() == b["index"].tolist()
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(1000))


@pytest.mark.parametrize("dtype,name", [(np.uint16, "uint16"), (np.uint32, "uint32")])
def test_token_windows(tmp_path: Path, dtype, name: str) -> None:
    tokens = np.random.default_rng(1).integers(0, 60000, 50_001, dtype=dtype)
    tokens.tofile(tmp_path / "train.bin")
    seq, stride = 256, 100
    cfg = {"dataset": {"path": str(tmp_path / "train.bin"), "format": "tokens", "seq_len": seq,
                       "stride": stride, "dtype": name}, "batch_size": 8, "drop_last": False}
    windows = (len(tokens) - seq) // stride + 1
    seen = []
    for b in sluice.Loader(cfg, rank=0, world_size=1):  # one batch at a time: 490 of them
        assert b["tokens"].shape[1] == seq
        for k, i in enumerate(b["index"].tolist()):
            assert np.array_equal(b["tokens"][k].numpy(), tokens[i * stride : i * stride + seq])
        seen += b["index"][~b["padding"]].tolist()
    assert sorted(seen) == list(range(windows))


def test_auto_detects_npy_and_tokens_with_seq_len(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((10, 2), np.float32))
    assert len(sluice.Loader({"dataset": {"path": str(tmp_path / "x.npy")}, "batch_size": 5},
                             rank=0, world_size=1)) == 2
    np.zeros(100, np.uint16).tofile(tmp_path / "t.bin")
    assert len(sluice.Loader({"dataset": {"path": str(tmp_path / "t.bin"), "seq_len": 10},
                              "batch_size": 5}, rank=0, world_size=1)) == 2
    with pytest.raises(ValueError, match="set dataset.format"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "t.bin")}}, rank=0, world_size=1)


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "odd.bin").write_bytes(b"\0" * 1001)
    with pytest.raises(sluice.CorruptionError, match=r"odd.bin: 1001 bytes is not a whole number"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "odd.bin"), "format": "tokens",
                                   "seq_len": 8}}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="dataset.seq_len: required"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "odd.bin"), "format": "tokens"}},
                      rank=0, world_size=1)
    np.save(tmp_path / "a.npy", np.zeros((100, 4), np.float32))
    whole = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:-100])
    with pytest.raises(sluice.CorruptionError, match=r"cut.npy: truncated"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "cut.npy")}}, rank=0, world_size=1)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(sluice.CorruptionError, match=r"junk.npy: not a .npy file"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "junk.npy")}}, rank=0, world_size=1)
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(RuntimeError, match=r"s.npy: dtype <U1: not a numeric dtype"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "s.npy")}}, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError):
        sluice.Loader({"dataset": {"path": str(tmp_path / "none.npy"), "format": "npy"}},
                      rank=0, world_size=1)


@pytest.mark.skipif(not CLI.exists(), reason="no build/sluice (the CLI is built by scripts/test.sh)")
def test_pack_then_read_gives_the_same_samples(tmp_path: Path) -> None:
    a = np.random.default_rng(3).integers(0, 1000, (300, 2, 3), dtype=np.int32)
    np.save(tmp_path / "a.npy", a)
    subprocess.run([CLI, "pack", tmp_path / "a.npy", "-o", tmp_path / "packed", "--json"],
                   check=True, capture_output=True)
    cfg = {"dataset": {"path": str(tmp_path / "packed")}, "batch_size": 30}
    seen = 0
    for b in sluice.Loader(cfg, rank=0, world_size=1):
        assert b["data"].dtype == torch.int32 and b["data"].shape[1:] == (2, 3)
        assert torch.equal(b["data"], torch.from_numpy(a[b["index"].numpy()]))
        seen += len(b["index"])
    assert seen == 300
    tokens = np.arange(5000, dtype=np.uint32)
    tokens.tofile(tmp_path / "t.bin")
    subprocess.run([CLI, "pack", tmp_path / "t.bin", "-o", tmp_path / "tok", "--format", "tokens",
                    "--seq-len", "64", "--dtype", "uint32"], check=True, capture_output=True)
    ds = sluice.Dataset(str(tmp_path / "tok"))
    assert len(ds) == 5000 // 64
    assert np.frombuffer(ds.sample(10)["tokens"], np.uint32).tolist() == list(range(640, 704))


def make_tree(root: Path, per_class: int = 40) -> dict[str, bytes]:
    """An ImageFolder-style tree: ROOT/<class>/<file>, sizes 0..9000 bytes; returns the bytes."""
    rng = np.random.default_rng(5)
    files = {}
    for c in ["cat", "dog", "eel"]:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            data = rng.integers(0, 256, int(rng.integers(0, 9000)), dtype=np.uint8).tobytes()
            (root / c / f"{k:04d}.bin").write_bytes(data)
            files[f"{c}/{k:04d}.bin"] = data
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x").write_bytes(b"skipped")
    return files


@pytest.mark.parametrize("direct", [True, False])
def test_files_read_in_place(tmp_path: Path, direct: bool) -> None:
    files = make_tree(tmp_path / "tree")
    names = sorted(files)
    cfg = {"dataset": {"path": str(tmp_path / "tree")}, "batch_size": 16, "drop_last": False,
           "io": {"direct": direct}}
    loader = sluice.Loader(cfg, rank=0, world_size=1)
    assert loader.classes == ["cat", "dog", "eel"]
    seen = []
    for b in loader:
        data, offsets = b["data"].numpy(), b["data_offsets"].numpy()
        for k, i in enumerate(b["index"].tolist()):
            name = names[i]
            assert data[offsets[k] : offsets[k + 1]].tobytes() == files[name], name
            assert b["label"][k].item() == ["cat", "dog", "eel"].index(name.split("/")[0])
        seen += b["index"][~b["padding"]].tolist()
    assert sorted(seen) == list(range(len(files)))


def test_files_errors_name_the_file(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "tree", per_class=3)
    cfg = {"dataset": {"path": str(tmp_path / "tree"), "format": "files"}, "batch_size": 9}
    loader = sluice.Loader(cfg, rank=0, world_size=1)
    (tmp_path / "tree" / "dog" / "0001.bin").unlink()  # gone after the scan
    with pytest.raises(FileNotFoundError, match=r"dog/0001.bin: sample 4: open"):
        list(loader)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"a.bin: not inside a class directory"):
        sluice.Loader({"dataset": {"path": str(tmp_path / "flat")}}, rank=0, world_size=1)
    assert files


def files_epoch(root: Path) -> dict[int, tuple[bytes, int]]:
    """index -> (bytes, label) of one epoch over a files tree."""
    out = {}
    cfg = {"dataset": {"path": str(root), "format": "files"}, "batch_size": 4, "drop_last": False}
    for b in sluice.Loader(cfg, rank=0, world_size=1):
        data, offsets = b["data"].numpy(), b["data_offsets"].numpy()
        for k, i in enumerate(b["index"].tolist()):
            out[i] = (data[offsets[k] : offsets[k + 1]].tobytes(), b["label"][k].item())
    return out


def test_nested_trees_are_labelled_by_their_first_directory(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for rel in ["cat/train/a.jpg", "cat/val/b.jpg", "dog/train/c.jpg", "dog/val/deep/d.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    loader = sluice.Loader({"dataset": {"path": str(root), "format": "files"}}, rank=0, world_size=1)
    assert loader.classes == ["cat", "dog"]  # as torchvision's ImageFolder: not train / val
    got = files_epoch(root)
    assert {d.decode(): label for d, label in got.values()} == {
        "cat/train/a.jpg": 0, "cat/val/b.jpg": 0, "dog/train/c.jpg": 1, "dog/val/deep/d.jpg": 1}
    if CLI.exists():  # sluice pack labels alike
        subprocess.run([CLI, "pack", root, "-o", tmp_path / "packed"], check=True, capture_output=True)
        ds = sluice.Dataset(str(tmp_path / "packed"))
        assert ds.classes == ["cat", "dog"]
        labels = {ds.sample(i)["data"].decode(): np.frombuffer(ds.sample(i)["label"], np.int64)[0]
                  for i in range(len(ds))}
        assert labels["dog/val/deep/d.jpg"] == 1 and labels["cat/val/b.jpg"] == 0


def test_a_file_that_grew_or_shrank_after_listing_is_an_error(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=3)
    cfg = {"dataset": {"path": str(tmp_path / "tree"), "format": "files"}, "batch_size": 9}
    for change in (b"more", None):
        loader = sluice.Loader(cfg, rank=0, world_size=1)
        f = tmp_path / "tree" / "dog" / "0001.bin"
        data = f.read_bytes()
        f.write_bytes(data + change if change else data[: len(data) // 2])
        with pytest.raises(sluice.CorruptionError,
                           match=r"dog/0001.bin: sample 4: size changed since the tree was listed"):
            list(b["index"] for b in loader)
        f.write_bytes(data)


def test_symbolic_links_inside_the_tree_are_followed_and_outside_skipped(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = tmp_path / "tree"
    make_tree(root, per_class=2)
    (tmp_path / "secret").write_bytes(b"outside the tree")
    (root / "cat" / "leak.bin").symlink_to(tmp_path / "secret")       # a file outside: skipped
    (root / "outer").symlink_to(tmp_path, target_is_directory=True)   # a class outside: skipped
    (root / "lynx").symlink_to(root / "cat", target_is_directory=True)  # a class inside: followed
    (root / "dog" / "again").symlink_to(root / "dog", target_is_directory=True)  # a cycle
    (root / "eel" / "dup.bin").symlink_to(root / "eel" / "0000.bin")  # a file inside: followed
    loader = sluice.Loader({"dataset": {"path": str(root), "format": "files"}}, rank=0, world_size=1)
    assert loader.classes == ["cat", "dog", "eel", "lynx"]
    err = capfd.readouterr().err
    assert "skipped 3 symbolic links leading out of the tree" in err, err  # leak.bin twice (via lynx)
    got = files_epoch(root)
    assert all(d != b"outside the tree" for d, _ in got.values())
    assert len(got) == 2 * 3 + 2 + 1 + 2  # cat, dog, eel; lynx's two; eel/dup.bin; dog/again's two
    # A file replaced by a link after the listing cannot lead out either.
    loader = sluice.Loader({"dataset": {"path": str(root), "format": "files"}, "batch_size": 4,
                            "drop_last": False}, rank=0, world_size=1)
    (root / "eel" / "0001.bin").unlink()
    (root / "eel" / "0001.bin").symlink_to(Path("..") / ".." / "secret")
    with pytest.raises(OSError, match=r"eel/0001.bin: sample \d+: open: .*leads out of the tree"):
        list(b["index"] for b in loader)


def write_shards(root: Path, shards: int = 3, per_shard: int = 50) -> list[dict]:
    """WebDataset shards made with webdataset's own TarWriter; returns each sample's fields."""
    import webdataset as wds

    rng = np.random.default_rng(9)
    samples = []
    root.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:04d}.tar")) as w:
            for k in range(per_shard):
                i = s * per_shard + k
                sample = {"__key__": f"sample{i:06d}",
                          "jpg": rng.integers(0, 256, int(rng.integers(1, 20000)), dtype=np.uint8).tobytes(),
                          "cls": str(i % 7).encode(),
                          "json": f'{{"i": {i}}}'.encode()}
                w.write(sample)
                samples.append(sample)
    return samples


@pytest.mark.parametrize("direct", [True, False])
def test_tar_shards_read_in_place(tmp_path: Path, direct: bool) -> None:
    samples = write_shards(tmp_path / "wds")
    cfg = {"dataset": {"path": str(tmp_path / "wds")}, "batch_size": 16, "drop_last": False,
           "io": {"direct": direct}}
    loader = sluice.Loader(cfg, rank=0, world_size=1)
    assert [f["name"] for f in loader.fields] == ["cls", "jpg", "json"]
    seen = []
    for b in loader:
        assert b["cls"].dtype == torch.int64
        jpg, jo = b["jpg"].numpy(), b["jpg_offsets"].numpy()
        js, so = b["json"].numpy(), b["json_offsets"].numpy()
        for k, i in enumerate(b["index"].tolist()):
            assert jpg[jo[k] : jo[k + 1]].tobytes() == samples[i]["jpg"], f"sample {i}"
            assert js[so[k] : so[k + 1]].tobytes() == samples[i]["json"]
            assert b["cls"][k].item() == i % 7
        seen += b["index"][~b["padding"]].tolist()
    assert sorted(seen) == list(range(len(samples)))


def test_a_read_only_dataset_directory_is_not_written(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run as root, which writes through a mode of 0555: the mode must decide.
    write_shards(tmp_path / "wds", shards=2, per_shard=10)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(p.name for p in (tmp_path / "wds").iterdir())
    (tmp_path / "wds").chmod(0o555)
    try:
        assert len(sluice.Dataset(str(tmp_path / "wds"))) == 20
        assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == before
        assert len(list((tmp_path / "xdg" / "sluice").glob("shard-*.tar-*.sluice-index"))) == 2
        assert len(sluice.Dataset(str(tmp_path / "wds"))) == 20  # from the user's cache
    finally:
        (tmp_path / "wds").chmod(0o755)


def test_tar_index_is_cached_and_a_changed_tar_rescanned(tmp_path: Path) -> None:
    import webdataset as wds

    write_shards(tmp_path / "wds", shards=1, per_shard=10)
    tar = tmp_path / "wds" / "shard-0000.tar"
    assert len(sluice.Dataset(str(tar))) == 10
    cache = Path(str(tar) + ".sluice-index")
    assert cache.exists()
    with wds.TarWriter(str(tar)) as w:  # rewritten with 4 samples: the cache must not be used
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": b"x" * i, "cls": b"1", "json": b"{}"})
    assert len(sluice.Dataset(str(tar))) == 4


def tar_labels(tar: Path) -> list[int]:
    cfg = {"dataset": {"path": str(tar), "format": "tar"}, "batch_size": 10, "drop_last": False,
           "shuffle": {"mode": "none"}}
    return [v for b in sluice.Loader(cfg, rank=0, world_size=1) for v in b["cls"].tolist()]


def test_a_tar_rewritten_with_its_size_and_mtime_kept_is_rescanned(tmp_path: Path) -> None:
    import webdataset as wds

    tar = tmp_path / "t.tar"

    def write(label: str) -> None:
        with wds.TarWriter(str(tar)) as w:
            for i in range(10):
                w.write({"__key__": f"k{i}", "jpg": b"x" * 100, "cls": label.encode()})

    write("1")
    stat = tar.stat()
    assert tar_labels(tar) == [1] * 10  # scanned, and the index cached beside it
    write("2")  # the same size, new labels...
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old mtime put back
    assert tar.stat().st_size == stat.st_size and tar.stat().st_mtime_ns == stat.st_mtime_ns
    assert tar_labels(tar) == [2] * 10
    # A damaged cache is not believed either.
    cache = Path(str(tar) + ".sluice-index")
    data = bytearray(cache.read_bytes())
    data[-9] ^= 0x01  # inside the labels
    cache.write_bytes(bytes(data))
    assert tar_labels(tar) == [2] * 10


def test_bad_tars_name_the_file(tmp_path: Path) -> None:
    write_shards(tmp_path / "wds", shards=1, per_shard=5)
    tar = tmp_path / "wds" / "shard-0000.tar"
    data = bytearray(tar.read_bytes())
    data[100] ^= 0xFF  # inside the first header: its checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(sluice.CorruptionError, match=r"bad.tar: bad tar header at offset 0"):
        sluice.Dataset(str(tmp_path / "bad.tar"))
    (tmp_path / "cut.tar").write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(sluice.CorruptionError, match=r"cut.tar: (tar member .* runs past|truncated)"):
        sluice.Dataset(str(tmp_path / "cut.tar"))


def tar_header(name: bytes, size_field: bytes, typeflag: bytes) -> bytes:
    """One 512-byte ustar header with `size_field` (12 bytes) as given and a valid checksum."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    assert len(h) == 512
    return bytes(h)


@pytest.mark.parametrize("typeflag", [b"0", b"L"])
def test_absurd_tar_sizes_fail_at_once_naming_file_and_offset(tmp_path: Path, typeflag: bytes) -> None:
    # Base-256 sizes (GNU): 2^64 - 512 for a member, 2^40 for a long name.
    huge = b"\x80" + ((2**64 - 512) if typeflag == b"0" else 2**40).to_bytes(11, "big")
    tar = tmp_path / "absurd.tar"
    tar.write_bytes(tar_header(b"k0.jpg", b"%011o\0" % 3, b"0") + b"abc".ljust(512, b"\0")
                    + tar_header(b"k1.jpg", huge, typeflag) + b"\0" * 4096)
    with pytest.raises(sluice.CorruptionError, match=r"absurd.tar: tar .* at offset 1024"):
        sluice.Dataset(str(tar))


@pytest.mark.skipif(not CLI.exists(), reason="no build/sluice (the CLI is built by scripts/test.sh)")
def test_pack_tar_shards(tmp_path: Path) -> None:
    samples = write_shards(tmp_path / "wds", shards=2, per_shard=20)
    subprocess.run([CLI, "pack", tmp_path / "wds", "-o", tmp_path / "packed"], check=True,
                   capture_output=True)
    ds = sluice.Dataset(str(tmp_path / "packed"))
    assert len(ds) == 40
    for i in (0, 17, 39):
        s = ds.sample(i)
        assert s["jpg"] == samples[i]["jpg"] and s["json"] == samples[i]["json"]
        assert np.frombuffer(s["cls"], np.int64)[0] == i % 7


def test_dataset_opens_what_the_loader_reads(tmp_path: Path) -> None:
    """sluice.Dataset(PATH) tells formats apart as the Loader does (it once took only packed
    directories and .tar/.npy files): a directory of tars, a files tree, a .npy array."""
    samples = write_shards(tmp_path / "wds", shards=2, per_shard=10)
    ds = sluice.Dataset(str(tmp_path / "wds"))
    assert ds.format == "tar" and len(ds) == 20 and len(ds.shards) == 2
    assert ds.sample(13)["jpg"] == samples[13]["jpg"]

    files = make_tree(tmp_path / "tree", per_class=3)
    ds = sluice.Dataset(str(tmp_path / "tree"))
    assert ds.format == "files" and len(ds) == 9 and ds.classes == ["cat", "dog", "eel"]
    assert ds.sample(4)["data"] == files["dog/0001.bin"]
    assert np.frombuffer(ds.sample(4)["label"], np.int64)[0] == 1

    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.int32).reshape(4, 3))
    ds = sluice.Dataset(str(tmp_path / "x.npy"))
    assert ds.format == "npy" and len(ds) == 4
    assert np.frombuffer(ds.sample(2)["data"], np.int32).tolist() == [6, 7, 8]


@pytest.mark.skipif(not CLI.exists(), reason="no build/sluice (the CLI is built by scripts/test.sh)")
def test_inspect_and_verify_take_what_the_loader_reads(tmp_path: Path) -> None:
    write_shards(tmp_path / "wds", shards=2, per_shard=10)
    make_tree(tmp_path / "tree", per_class=3)
    for path, fmt, n in [(tmp_path / "wds", "tar", 20), (tmp_path / "tree", "files", 9)]:
        out = json.loads(subprocess.run([CLI, "inspect", path, "--json"], check=True,
                                        capture_output=True, text=True).stdout)
        assert (out["format"], out["samples"]) == (fmt, n)
        done = subprocess.run([CLI, "verify", path], capture_output=True, text=True)
        assert done.returncode == 0 and "every sample read" in done.stdout, done.stdout + done.stderr

    # No checksums to compare, but a tar cut short is found and named.
    tar = tmp_path / "wds" / "shard-0001.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    done = subprocess.run([CLI, "verify", tmp_path / "wds"], capture_output=True, text=True)
    assert done.returncode == 1 and "shard-0001.tar" in done.stderr, done.stderr
