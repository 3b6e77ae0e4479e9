"""data/download.py against archives made here and served by a loopback HTTP server with Range support."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_download():
    spec = importlib.util.spec_from_file_location("data_download", REPO / "data" / "download.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


download = load_download()


class ArchiveServer:
    """Serves `files` (name -> bytes) on 127.0.0.1; honours `Range: bytes=N-` unless `ranges` is False.

    The i-th response with i < len(`cuts`) sends only cuts[i] bytes of its body, then, after `stall_s` seconds,
    closes the connection: a download cut short.
    """

    def __init__(self, files: dict[str, bytes], ranges: bool = True, cuts: Sequence[int] = (),
                 stall_s: float = 0) -> None:
        self.files, self.ranges, self.requests = files, ranges, []
        self.cuts, self.stall_s = list(cuts), stall_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match and server.ranges else 0
                if start >= len(body) and match:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cuts.pop(0) if server.cuts else None
                self.wfile.write(body[start:][:cut])
                if cut is not None:
                    time.sleep(server.stall_s)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: several read chunks
VOC_MEMBERS = {"VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000033\n",
               "VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg": BIG}


def test_fetch_verifies_and_resumes_with_a_range_request(tmp_path):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}) as server:
        target = tmp_path / "voc.tgz"
        (tmp_path / "voc.tgz.part").write_bytes(archive[:1000])  # an interrupted earlier run
        assert download.fetch(server.url("voc.tgz"), target, md5(archive)) == target
        assert target.read_bytes() == archive and not (tmp_path / "voc.tgz.part").exists()
        assert server.requests == [("/voc.tgz", "bytes=1000-")]
        download.fetch(server.url("voc.tgz"), target, md5(archive))  # already there and valid: no request
        assert len(server.requests) == 1


def test_fetch_restarts_when_the_server_ignores_range(tmp_path):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}, ranges=False) as server:
        (tmp_path / "voc.tgz.part").write_bytes(b"x" * 1000)
        download.fetch(server.url("voc.tgz"), tmp_path / "voc.tgz", md5(archive))
        assert (tmp_path / "voc.tgz").read_bytes() == archive
        assert server.requests == [("/voc.tgz", "bytes=1000-")]


def test_fetch_accepts_a_complete_partial_file_answered_416(tmp_path):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}) as server:
        (tmp_path / "voc.tgz.part").write_bytes(archive)
        download.fetch(server.url("voc.tgz"), tmp_path / "voc.tgz", md5(archive))
        assert (tmp_path / "voc.tgz").read_bytes() == archive


@pytest.mark.parametrize("stall", [False, True], ids=["closed", "timeout"])
def test_fetch_resumes_a_dropped_connection_with_range_requests(tmp_path, monkeypatch, stall):
    archive = tar_bytes(VOC_MEMBERS)
    if stall:  # the server goes silent after the cut: the client's read times out
        monkeypatch.setattr(download, "TIMEOUT_S", 0.5)
    with ArchiveServer({"voc.tgz": archive}, cuts=[1000, 2000], stall_s=3 if stall else 0) as server:
        download.fetch(server.url("voc.tgz"), tmp_path / "voc.tgz", md5(archive))
        assert (tmp_path / "voc.tgz").read_bytes() == archive and not (tmp_path / "voc.tgz.part").exists()
        assert server.requests == [("/voc.tgz", None), ("/voc.tgz", "bytes=1000-"), ("/voc.tgz", "bytes=3000-")]


def test_a_download_cut_on_every_attempt_keeps_the_part_and_resumes_on_the_next_run(tmp_path, monkeypatch, capsys):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}, cuts=[1000] * 3) as server:
        url = server.url("voc.tgz")
        monkeypatch.setitem(download.SOURCES, "voc", download.Source(url, "voc.tgz", md5(archive), "VOCdevkit/VOC2012"))
        assert download.main(["voc", "--dest", str(tmp_path)]) == 2
        error = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
        assert error.startswith(f"error: download of {url} incomplete after 3 attempts: 3000 of {len(archive)} "
                                f"bytes arrived") and error.endswith("run the same command again to resume")
        assert (tmp_path / "voc.tgz.part").read_bytes() == archive[:3000]
        assert download.main(["voc", "--dest", str(tmp_path)]) == 0  # the failed run released its lock
        assert server.requests[-1] == ("/voc.tgz", "bytes=3000-")
        assert (tmp_path / "voc.tgz").read_bytes() == archive


def test_fetch_deletes_a_complete_but_corrupt_download_and_says_so(tmp_path):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}) as server:
        (tmp_path / "voc.tgz.part").write_bytes(b"x" * 1000)  # a corrupt start, resumed to full size
        with pytest.raises(download.DownloadError, match=rf"complete \({len(archive)} bytes\) but corrupt, so it was "
                                                         r"deleted: run again"):
            download.fetch(server.url("voc.tgz"), tmp_path / "voc.tgz", md5(archive))
        assert not (tmp_path / "voc.tgz.part").exists() and not (tmp_path / "voc.tgz").exists()


HOLD_LOCK = """import fcntl, os, sys, time
file = open(sys.argv[1], "w")
fcntl.flock(file, fcntl.LOCK_EX)
file.write(str(os.getpid()))
file.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_download_into_the_same_folder_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    archive = tar_bytes(VOC_MEMBERS)
    with ArchiveServer({"voc.tgz": archive}) as server:
        monkeypatch.setitem(download.SOURCES, "voc", download.Source(
            server.url("voc.tgz"), "voc.tgz", md5(archive), "VOCdevkit/VOC2012"))
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "voc.tgz.lock")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "locked\n"
            assert download.main(["voc", "--dest", str(tmp_path)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"already being downloaded by process {holder.pid};" in err
            assert server.requests == [] and not (tmp_path / "voc.tgz.part").exists()
        finally:
            holder.kill()
            holder.wait()
        assert download.main(["voc", "--dest", str(tmp_path)]) == 0  # a killed holder holds nothing
        assert (tmp_path / "voc.tgz.lock").read_text() == str(os.getpid())
        with download._lock(tmp_path / "voc.tgz"):  # released after the download, in this process too
            pass


def test_files_are_created_with_the_users_umask(tmp_path, monkeypatch):
    archive = zip_bytes({"SegNet-X/CamVid/train.txt": b"t\n"})
    with ArchiveServer({"camvid.zip": archive}) as server:
        monkeypatch.setitem(download.SOURCES, "camvid", download.Source(
            server.url("camvid.zip"), "camvid.zip", md5(archive), "camvid", strip_prefix="SegNet-X/CamVid/"))
        previous = os.umask(0o027)
        try:
            assert download.main(["camvid", "--dest", str(tmp_path)]) == 0
        finally:
            os.umask(previous)
    for name in ["camvid.zip", "camvid.zip.lock", "camvid/train.txt"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_fetch_rejects_a_bad_checksum_and_deletes_the_file(tmp_path):
    with ArchiveServer({"voc.tgz": b"corrupted"}) as server:
        with pytest.raises(download.DownloadError, match=f"checksum mismatch for voc.tgz: md5 {md5(b'corrupted')}, "
                                                         f"expected {'0' * 32}"):
            download.fetch(server.url("voc.tgz"), tmp_path / "voc.tgz", "0" * 32)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(download.DownloadError, match="HTTP 404"):
            download.fetch(server.url("missing.tgz"), tmp_path / "missing.tgz", "0" * 32)


def test_extract_tar_and_zip_with_prefix_stripping(tmp_path):
    (tmp_path / "a.tgz").write_bytes(tar_bytes(VOC_MEMBERS))
    download.extract(tmp_path / "a.tgz", tmp_path / "out")
    assert (tmp_path / "out" / "VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg").read_bytes() == BIG
    (tmp_path / "c.zip").write_bytes(zip_bytes({"Repo-abc/README.md": b"x", "Repo-abc/CamVid/train.txt": b"t\n",
                                                "Repo-abc/CamVid/train/0001.png": b"png"}))
    download.extract(tmp_path / "c.zip", tmp_path / "camvid", strip_prefix="Repo-abc/CamVid/")
    assert sorted(p.relative_to(tmp_path / "camvid").as_posix() for p in (tmp_path / "camvid").rglob("*")) == [
        "train", "train.txt", "train/0001.png"]


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes])
def test_extract_refuses_members_outside_dest(tmp_path, make):
    (tmp_path / "evil").write_bytes(make({"../escape.txt": b"x"}))
    with pytest.raises(download.DownloadError, match="outside"):
        download.extract(tmp_path / "evil", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    (tmp_path / "junk").write_bytes(b"neither")
    with pytest.raises(download.DownloadError, match="neither a zip nor a tar"):
        download.extract(tmp_path / "junk", tmp_path / "out")


def test_main_downloads_and_extracts_then_reports_ready(tmp_path, monkeypatch, capsys):
    archive = zip_bytes({"SegNet-X/CamVid/train.txt": b"/SegNet/CamVid/train/a.png /SegNet/CamVid/trainannot/a.png\n"})
    with ArchiveServer({"camvid.zip": archive}) as server:
        monkeypatch.setitem(download.SOURCES, "camvid", download.Source(
            server.url("camvid.zip"), "camvid.zip", md5(archive), "camvid", strip_prefix="SegNet-X/CamVid/"))
        assert download.main(["camvid", "--dest", str(tmp_path)]) == 0
        assert (tmp_path / "camvid" / "train.txt").is_file()
        assert download.main(["camvid", "--dest", str(tmp_path)]) == 0  # second run: nothing to do
        assert len(server.requests) == 1 and "camvid: already in" in capsys.readouterr().out


def test_no_network_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    with ArchiveServer({}) as server:
        url = server.url("voc.tar")
    # The server is closed: connecting to its port is refused, as with no network.
    monkeypatch.setitem(download.SOURCES, "voc", download.Source(url, "voc.tar", "0" * 32, "VOCdevkit/VOC2012"))
    assert download.main(["voc", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot download {url}: ") and "no network" in err


def test_cityscapes_prints_the_manual_steps(capsys, tmp_path):
    assert download.main(["cityscapes", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gtFine_trainvaltest.zip" in out and "leftImg8bit_trainvaltest.zip" in out
    assert f"{tmp_path}/cityscapes" in out


def test_sources_pin_md5_checksums():
    assert set(download.SOURCES) == {"voc", "sbd", "camvid"}
    assert all(re.fullmatch(r"[0-9a-f]{32}", s.md5) for s in download.SOURCES.values())
