"""Image transforms in the loader threads (config `transforms:`), on WebDataset tar shards written
with webdataset's TarWriter and images encoded by Pillow: the output against Pillow's own
resize and crop, the same random crop for a sample on any number of ranks and after a resume,
normalize and layout, PNG and WebP, a damaged image named (or skipped and counted), packed
shards and samples read from a peer transformed alike, optional tar fields, and
examples/train_images.py learning from JPEGs through transforms."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

# torch, Pillow and webdataset are installed by scripts/python-env.sh: imported plainly, so that
# one missing fails the run instead of skipping these tests.
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import sluice
from conftest import split_shards

N = 24
RESIZE_CROP = [{"decode": "rgb"}, {"resize": 256}, {"center_crop": 224}]
RANDOM = [{"decode": "rgb"}, {"random_resized_crop": {"size": 160, "scale": [0.08, 1.0]}},
          {"flip": 0.5}]


def picture(rng: np.random.Generator) -> np.ndarray:
    """An image of ImageNet-like size with smooth structure (gradients and waves) in each
    channel, so that resampling differences stay small and any shift or swap shows."""
    h, w = (int(v) for v in rng.integers(300, 600, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = rng.uniform(9, 40, 2)
    a = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / fx) * np.cos(y / fy)], -1)
    return a.clip(0, 255).astype(np.uint8)


def encode(a: np.ndarray, fmt: str) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return b.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list]:
    """Two tar shards of JPEGs (as webdataset writes them) and the images Pillow decodes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(7)
    decoded = []
    for s in range(2):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as w:
            for i in range(N // 2):
                data = encode(picture(rng), "JPEG")
                decoded.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                w.write({"__key__": f"s{s}-{i:04d}", "jpg": data, "cls": str(i).encode()})
    return root, decoded


def loader(root: Path, steps: list, **kw) -> sluice.Loader:
    cfg = {"dataset": {"path": str(root), "format": "tar"}, "batch_size": 8,
           "shuffle": {"mode": "none"}, "transforms": {"jpg": steps}}
    cfg.update(kw)
    return sluice.Loader(cfg)


def by_index(ld: sluice.Loader, field: str = "jpg") -> dict[int, np.ndarray]:
    out = {}
    for batch in ld:
        for k, i in enumerate(batch["index"].tolist()):
            if "padding" not in batch or not bool(batch["padding"][k]):
                out[i] = batch[field][k].numpy().copy()
    return out


def pillow_resize_crop(a: np.ndarray, short: int, crop: int) -> np.ndarray:
    im = Image.fromarray(a)
    w, h = im.size
    size = (short, short * h // w) if w <= h else (short * w // h, short)
    im = im.resize(size, Image.BILINEAR)  # antialiased when it shrinks
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


def test_resize_and_center_crop_match_pillow(shards) -> None:
    root, decoded = shards
    got = by_index(loader(root, RESIZE_CROP))
    assert sorted(got) == list(range(N))
    for i, out in got.items():
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - pillow_resize_crop(decoded[i], 256, 224).astype(int))
        assert diff.mean() < 2.0, f"sample {i}: mean difference {diff.mean():.2f} from Pillow"


def test_random_crops_are_the_same_on_any_rank_count_and_after_resume(shards,
                                                                       tmp_path: Path) -> None:
    root, _ = shards
    one = by_index(loader(root, RANDOM))
    two = {}
    for rank in range(2):  # 12 samples each: a batch of 8 and one of 4 plus padding
        two.update(by_index(loader(root, RANDOM, drop_last=False,
                                   distributed={"rank": rank, "world_size": 2})))
    assert sorted(one) == sorted(two) == list(range(N))
    for i in one:
        assert one[i].shape == (160, 160, 3)
        assert np.array_equal(one[i], two[i]), f"sample {i} differs between 1 and 2 ranks"
    # Random per sample: eight copies of one image are cropped eight ways.
    same = encode(picture(np.random.default_rng(1)), "JPEG")
    with wds.TarWriter(str(tmp_path / "same.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"c{i}", "jpg": same})
    copies = by_index(loader(tmp_path, RANDOM))
    assert len({c.tobytes() for c in copies.values()}) == 8
    # And the next epoch crops anew.
    ld = loader(root, RANDOM)
    list(ld)
    again = by_index(ld)  # epoch 1
    assert sum(np.array_equal(one[i], again[i]) for i in one) < N // 4
    # Resumed mid-epoch: the rest of the epoch, each sample as before.
    ld = loader(root, RANDOM)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    del it
    resumed = loader(root, RANDOM)
    resumed.load_state_dict(state)
    rest = by_index(resumed)
    assert len(rest) == N - 8
    for i, out in rest.items():
        assert np.array_equal(out, one[i]), f"sample {i} cropped differently after resume"


def test_normalize_float16_chw(shards) -> None:
    root, _ = shards
    plain = by_index(loader(root, RESIZE_CROP))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    steps = RESIZE_CROP + [{"normalize": {"mean": mean, "std": std, "dtype": "float16"}},
                           {"layout": "chw"}]
    ld = loader(root, steps)
    batch = next(iter(ld))
    assert batch["jpg"].dtype == torch.float16 and tuple(batch["jpg"].shape) == (8, 3, 224, 224)
    for k, i in enumerate(batch["index"].tolist()):
        want = (plain[i].astype(np.float32) / 255 - mean) / std
        got = batch["jpg"][k].float().numpy().transpose(1, 2, 0)
        assert np.abs(got - want).max() < 0.02, f"sample {i}"


def test_png_webp_and_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pics = [picture(rng) for _ in range(4)]
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as w:
        for i, a in enumerate(pics):
            fmt = ["PNG", "WEBP", "PNG", "JPEG"][i]
            w.write({"__key__": f"k{i}", "img": encode(a, fmt)})
    cfg = {"dataset": {"path": str(tmp_path), "format": "tar"}, "batch_size": 4,
           "shuffle": {"mode": "none"},
           "transforms": {"img": [{"decode": "gray"}, {"center_crop": [200, 250]}]}}
    batch = next(iter(sluice.Loader(cfg)))
    assert tuple(batch["img"].shape) == (4, 200, 250, 1)
    assert batch["__key__"] == ["k0", "k1", "k2", "k3"]  # each sample's WebDataset key
    for k in range(3):  # lossless PNG, and WebP (lossy, near): Pillow's gray of the same crop
        a = pics[k]
        h, w = a.shape[:2]
        top, left = round((h - 200) / 2), round((w - 250) / 2)
        want = np.asarray(Image.fromarray(a).convert("L"))[top:top + 200, left:left + 250]
        diff = np.abs(batch["img"][k, :, :, 0].numpy().astype(int) - want.astype(int))
        assert diff.mean() < (0.6 if k != 1 else 3.0), f"image {k}: {diff.mean():.2f}"


def test_cmyk_jpegs_decode_as_pillow_converts_them(tmp_path: Path) -> None:
    # Print files and Photoshop's are CMYK (Pillow writes them with Adobe's marker, inverted).
    rng = np.random.default_rng(11)
    want = []
    with wds.TarWriter(str(tmp_path / "cmyk.tar")) as w:
        for i in range(3):
            b = io.BytesIO()
            Image.fromarray(picture(rng)).convert("CMYK").save(b, format="JPEG", quality=95)
            im = Image.open(io.BytesIO(b.getvalue()))
            assert im.mode == "CMYK"
            want.append(np.asarray(im.convert("RGB")))
            w.write({"__key__": f"k{i}", "jpg": b.getvalue()})
    cfg = {"dataset": {"path": str(tmp_path), "format": "tar"}, "batch_size": 3,
           "shuffle": {"mode": "none"},
           "transforms": {"jpg": [{"decode": "rgb"}, {"center_crop": [200, 250]}]}}
    batch = next(iter(sluice.Loader(cfg)))
    for k, a in enumerate(want):
        h, w = a.shape[:2]
        top, left = round((h - 200) / 2), round((w - 250) / 2)
        diff = np.abs(batch["jpg"][k].numpy().astype(int) -
                      a[top:top + 200, left:left + 250].astype(int))
        assert diff.mean() < 1.0, f"image {k}: mean difference {diff.mean():.2f} from Pillow"


def test_a_damaged_image_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        for i in range(8):
            data = encode(picture(rng), "JPEG")
            if i == 5:
                data = data[: len(data) // 2]  # cut short
            w.write({"__key__": f"k{i}", "jpg": data})
    cfg = {"dataset": {"path": str(tmp_path), "format": "tar"}, "batch_size": 8,
           "shuffle": {"mode": "none"}, "transforms": {"jpg": RESIZE_CROP}}
    with pytest.raises(sluice.CorruptionError, match=r"bad\.tar: sample 5: field jpg: JPEG"):
        list(sluice.Loader(cfg))
    ld = sluice.Loader(dict(cfg, transform_errors="skip"))
    batch = next(iter(ld))
    assert batch["padding"].tolist() == [False] * 5 + [True] + [False] * 2
    assert not batch["jpg"][5].any()
    assert ld.stats()["transform_skipped"] == 1


def test_config_errors_name_the_key(shards) -> None:
    root, _ = shards
    for steps, match in [
        ([{"resize": 256}], r"transforms\.jpg\[0\]: decode comes first"),
        ([{"decode": "rgb"}, {"resize": 256}], "no fixed size"),
        ([{"decode": "rgb"}, {"center_crop": 8}, {"blur": 3}], r"transforms\.jpg\[2\]"),
        ([{"decode": "gray"}, {"center_crop": 8},
          {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}}], "1 channel"),
    ]:
        with pytest.raises(ValueError, match=match):
            loader(root, steps)
    with pytest.raises(ValueError, match=r'has no field "png"'):
        sluice.Loader({"dataset": {"path": str(root), "format": "tar"}, "batch_size": 8,
                       "transforms": {"png": RESIZE_CROP}})


def test_the_image_training_example_learns(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "train_images.py"
    run = subprocess.run([sys.executable, str(example), str(tmp_path / "shards"), "--make", "192",
                          "--epochs", "3", "--batch-size", "32"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    accuracy = float(last.split("accuracy ")[1].split(",")[0])
    assert accuracy > 0.8, run.stdout


def test_optional_fields_instead_of_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    with wds.TarWriter(str(tmp_path / "meta.tar")) as w:
        for i in range(4):
            sample = {"__key__": f"k{i}", "jpg": encode(picture(rng), "JPEG"),
                      "cls": str(i).encode()}
            if i != 2:  # k2 has no caption
                sample["json"] = f'{{"caption": "image {i}"}}'.encode()
            w.write(sample)
    cfg = {"dataset": {"path": str(tmp_path), "format": "tar"}, "batch_size": 4,
           "shuffle": {"mode": "none"}, "transforms": {"jpg": RESIZE_CROP}}
    with pytest.raises(sluice.CorruptionError,
                       match=r'meta\.tar: sample "k2" has no field "json".*json: optional'):
        sluice.Loader(cfg)
    cfg["dataset"]["fields"] = {"json": "optional"}
    batch = next(iter(sluice.Loader(cfg)))
    offsets = batch["json_offsets"].tolist()
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    assert sizes[2] == 0 and all(s > 0 for k, s in enumerate(sizes) if k != 2), sizes
    assert batch["cls"].tolist() == [0, 1, 2, 3]
    assert batch["__key__"] == ["k0", "k1", "k2", "k3"]


def test_packed_and_remote_samples_transform_alike(tmp_path: Path) -> None:
    """JPEGs packed with sluice.DatasetWriter into several shards: a loader with all of them
    and one that reads half from a peer (another loader serving it) crop each sample alike."""
    import socket

    rng = np.random.default_rng(11)
    full = tmp_path / "full"
    with sluice.DatasetWriter(str(full), [{"name": "jpg", "dtype": "uint8", "shape": [-1]}],
                              shard_bytes=256 << 10) as w:
        for _ in range(16):
            w.add({"jpg": np.frombuffer(encode(picture(rng), "JPEG"), dtype=np.uint8)})
    even_dir, odd_dir, even, odd = split_shards(full, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{s.getsockname()[1]}"

    def cfg(path: Path) -> dict:
        return {"dataset": {"path": str(path)}, "batch_size": 4, "drop_last": False,
                "seed": 3, "transforms": {"jpg": RANDOM}}

    local = by_index(sluice.Loader(cfg(full)))
    serving = sluice.Loader(cfg(odd_dir), distributed={
        "listen": listen, "token": "tok", "peers": [{"address": "127.0.0.1:1", "shards": even}]})
    remote = by_index(sluice.Loader(cfg(even_dir), distributed={
        "peers": [{"address": listen, "shards": odd}], "token": "tok"}))
    serving.close()
    assert sorted(local) == sorted(remote) == list(range(16))
    for i in local:
        assert np.array_equal(local[i], remote[i]), f"sample {i}"
