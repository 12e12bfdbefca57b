"""The wheel as a user installs it: the manylinux wheel that scripts/python-env.sh built and
repaired with auditwheel, pip-installed into a new venv in an empty directory (numpy, no torch),
and run in a mount namespace where the system's copies of every library the wheel bundles, UCX,
and the GL and X11 libraries a slim container lacks are replaced by empty files: it imports,
packs, decodes a JPEG, iterates, runs the CLI, and says what to install when a command needs UCX.
The same for the wheel of every other CPython 3.10-3.13 on the machine (pyenv's). The wheel is
built from the sdist alone (scripts/python-env.sh), which holds the sources, not builds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

WHEELHOUSE = Path(sys.prefix) / "wheelhouse"  # scripts/python-env.sh's output
LIB_DIRS = [Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu"), Path("/usr/lib"),
            Path("/usr/local/lib")]
UCX = ["libucp.so.0", "libucs.so.0", "libuct.so.0", "libucm.so.0"]
# Not in python:3.11-slim or CUDA base images (OpenCV core links GLX; the wheel bundles a stub).
DISPLAY = ["libGLX.so.0", "libGLdispatch.so.0", "libGL.so.1", "libX11.so.6", "libxcb.so.1"]


THIS = f"{sys.version_info[0]}.{sys.version_info[1]}"
# The CPythons a wheel is made for (scripts/python-env.sh: this venv's and $SLUICE_WHEEL_PYTHONS).
PYTHONS = sorted({THIS, "3.10", "3.12", "3.13"}, key=lambda v: tuple(map(int, v.split("."))))


def interpreter(version: str) -> str | None:
    """An interpreter of `version` as python-env.sh finds it: pyenv's, else one on PATH."""
    if version == THIS:
        return sys.executable
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted(root.glob(f"versions/{version}.*/bin/python{version}"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-3])])
    if found:
        return str(found[-1])
    on_path = shutil.which(f"python{version}")
    return on_path if on_path and "/shims/" not in on_path else None


def the_wheel(version: str = THIS) -> Path:
    tag = "cp" + version.replace(".", "")
    wheels = sorted(WHEELHOUSE.glob(f"sluice-*-{tag}-{tag}-manylinux_*.whl"))
    if not wheels:
        if os.environ.get("CI"):
            pytest.fail(f"no repaired {tag} wheel in {WHEELHOUSE}: scripts/python-env.sh makes it")
        pytest.skip(f"no repaired {tag} wheel in {WHEELHOUSE} (scripts/python-env.sh makes it)")
    return wheels[-1]


def dt_needed(elf: bytes, scratch: Path) -> list[str]:
    """The DT_NEEDED entries of a shared library's bytes (written to `scratch` for readelf)."""
    scratch.write_bytes(elf)
    dynamic = subprocess.run(["readelf", "-d", str(scratch)], capture_output=True, text=True,
                             check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)


def linked_from_the_system() -> list[Path]:
    """The system files of the libraries sluice._C links itself (the -dev packages' libraries:
    liburing, yaml-cpp, fmt, curl, ...; read from the wheel before auditwheel repaired it),
    UCX's, and GL's and X11's. Not the others' dependencies: Python needs some (libffi, libssl)."""
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    raw = next((WHEELHOUSE / "raw").glob(f"sluice-*-{tag}-*.whl"))
    with zipfile.ZipFile(raw) as z:
        module = next(n for n in z.namelist() if re.match(r"sluice/_C\..*\.so$", n))
        needed = dt_needed(z.read(module), WHEELHOUSE / "raw" / "_C.so")
    system = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux")
    out: set[Path] = set()
    for name in [n for n in needed if not n.startswith(system)] + UCX + DISPLAY:
        for d in LIB_DIRS:
            if (d / name).exists():
                out.add((d / name).resolve())
    return sorted(out)


def test_wheel_is_manylinux_and_bundles_its_libraries() -> None:
    wheel = the_wheel()
    report = (WHEELHOUSE / "auditwheel-show.txt").read_text()
    tag = re.search(r'is consistent with\s+the following platform tag:\s+"(manylinux_2_\d+_x86_64)"',
                    report)
    assert tag and tag.group(1) in wheel.name, report
    names = zipfile.ZipFile(wheel).namelist()
    bundled = [Path(n).name for n in names if n.startswith("sluice.libs/")]
    for lib in ("liburing", "libyaml-cpp", "libfmt", "libxxhash", "libcurl", "libturbojpeg"):
        assert any(b.startswith(lib + "-") for b in bundled), (lib, bundled)
    assert not any(b.startswith(("libucp", "libucs", "libuct")) for b in bundled), bundled
    # The GLX in it is python/glx-stub.c: nothing more to load (no libX11, no libGLdispatch).
    assert not any(b.startswith(("libGLdispatch", "libX11", "libxcb")) for b in bundled), bundled
    glx = next(n for n in names if Path(n).name.startswith("libGLX-"))
    needed = dt_needed(zipfile.ZipFile(wheel).read(glx), WHEELHOUSE / "raw" / "libGLX.so")
    assert needed == [], needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sluice = sluice._cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="hiding libraries needs a mount namespace (root)")
@pytest.mark.parametrize("version", PYTHONS)
def test_fresh_venv_without_the_system_libraries(tmp_path: Path, version: str) -> None:
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (pyenv install {version})")
    wheel = the_wheel(version)
    hidden = linked_from_the_system()
    for lib in ("liburing", "libyaml-cpp", "libfmt", "libcurl", "libucp", "libGLX", "libX11"):
        assert any(p.name.startswith(lib) for p in hidden), (lib, hidden)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "numpy", str(wheel)], check=True)
    work = tmp_path / "empty"
    work.mkdir()
    from PIL import Image  # the JPEG the check decodes (Pillow is not in the new venv)

    jpeg = tmp_path / "red.jpg"
    Image.new("RGB", (64, 48), (200, 30, 60)).save(jpeg, quality=95)
    check = work.parent / "check.py"
    check.write_text(textwrap.dedent(f"""
        import ctypes, subprocess, sys
        import numpy as np
        # The hiding works: the system's copies cannot be loaded here.
        for name in ("liburing.so.2", "libucp.so.0", "libX11.so.6", "libGLX.so.0"):
            try:
                ctypes.CDLL(name)
            except OSError:
                pass
            else:
                sys.exit(f"{{name}} still loads: the test would prove nothing")
        import sluice
        assert "torch" not in sys.modules
        assert sluice.__file__.startswith({str(venv)!r}), sluice.__file__
        assert "%d.%d" % sys.version_info[:2] == {version!r}, sys.version
        with sluice.DatasetWriter("ds", [{{"name": "x", "dtype": "int64", "shape": [3]}}]) as w:
            for i in range(100):
                w.add({{"x": np.arange(3) + i}})
        loader = sluice.Loader({{"dataset": {{"path": "ds"}}, "batch_size": 10,
                                "shuffle": {{"mode": "none"}}}}, output="numpy")
        rows = np.concatenate([b["x"] for b in loader])
        assert np.array_equal(rows, np.arange(3)[None] + np.arange(100)[:, None]), rows
        # Decode and resize in the loader threads: OpenCV's core and imgproc load.
        jpeg = open({str(jpeg)!r}, "rb").read()
        fields = [{{"name": "jpg", "dtype": "uint8", "shape": [-1]}}]
        with sluice.DatasetWriter("img", fields) as w:
            for i in range(4):
                w.add({{"jpg": np.frombuffer(jpeg, np.uint8)}})
        loader = sluice.Loader({{"dataset": {{"path": "img"}}, "batch_size": 4,
                                "shuffle": {{"mode": "none"}},
                                "transforms": {{"jpg": [{{"decode": "rgb"}}, {{"resize": 16}},
                                                       {{"center_crop": 16}}]}}}}, output="numpy")
        images = next(iter(loader))["jpg"]
        assert images.shape == (4, 16, 16, 3), images.shape
        assert np.abs(images.astype(int) - [200, 30, 60]).max() <= 8, images[0, 0]
        try:
            sluice.torch
        except ImportError as e:
            assert "torch" in str(e)
        else:
            sys.exit("sluice.torch imported without torch installed")
        try:
            sluice.Loader({{"dataset": {{"path": "ds"}}, "batch_size": 10}})
        except ModuleNotFoundError as e:
            assert 'output="numpy"' in str(e), e
        else:
            sys.exit("a torch loader made without torch installed")
        cli = {str(venv / "bin/sluice")!r}
        out = subprocess.run([cli, "inspect", "ds", "--json"], capture_output=True, text=True)
        assert out.returncode == 0 and '"samples":100' in out.stdout.replace(" ", ""), out
        assert subprocess.run([cli, "verify", "ds"], capture_output=True).returncode == 0
        out = subprocess.run([cli, "serve", "ds", "--listen", "127.0.0.1:0", "--no-token"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "apt-get install libucx0" in out.stderr, out
        open("rows.parquet", "wb").close()
        out = subprocess.run([cli, "pack", "rows.parquet", "-o", "x"], capture_output=True,
                             text=True)
        assert out.returncode == 1 and "needs pyarrow: pip install pyarrow" in out.stderr, out
        print("ok")
    """))
    mounts = "".join(f"mount --bind /dev/null '{p}' && " for p in hidden)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV")}
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"{mounts}exec '{venv}/bin/python' '{check}'"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout, out.stderr)


def test_the_sdist_holds_the_sources() -> None:
    """scripts/python-env.sh built the wheel from it alone: a file it lacks failed that build."""
    the_wheel()
    sdist = next((WHEELHOUSE / "sdist").glob("sluice-*.tar.gz"))
    members = tarfile.open(sdist).getnames()
    top = sdist.name.removesuffix(".tar.gz")
    for path in ("pyproject.toml", "CMakeLists.txt", "src/net/ucx.cc", "python/sluice/_cli.py",
                 "include/sluice/sluice.h"):
        assert f"{top}/{path}" in members, path
    assert not [m for m in members if m.startswith((f"{top}/build", f"{top}/.venv"))]
