"""Sources read in place: NumPy .npy arrays and flat token files (nanoGPT / Megatron style),
made with NumPy as they are in the wild."""

from __future__ import annotations

from pathlib import Path

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
