"""Hostile or damaged bundles are refused by ``edgekit verify`` naming the member, and nothing is extracted anywhere.

Each crafted ``.tar.gz`` (a ``..`` or absolute member, a link, a device, a member declaring more
bytes than the limit, too many members, a duplicate, a truncated or non-tar file) and each damaged
bundle folder (a file whose sha256 differs from the manifest, a missing or unreadable manifest, an
unlisted file) ends in one ``edgekit: error:`` line naming the member or file, exit 2, no traceback;
afterwards the temporary folder, the working directory and the folders around the archive hold
exactly what they held before.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from edgekit import artifact
from edgekit.cli import main
from edgekit.package import SCHEMA
from tests.robust.clean import assert_clean_failure

FILES = {"model.gguf": b"GGUF" + bytes(range(256)) * 8, "tokenizer.json": b'{"model": {}}',
         "run_llamacpp.py": b"print('hi')\n"}


def make_folder(root: Path, files: dict[str, bytes] = FILES) -> Path:
    """A minimal valid bundle folder: the files and a manifest listing their sha256 and size."""
    folder = root / "tiny-gguf-q8_0-12345678"
    folder.mkdir(parents=True)
    table = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        table[name] = {"sha256": artifact.sha256_file(folder / name), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "files": table}))
    return folder


def add(tf: tarfile.TarFile, name: str, data: bytes | None = b"x", kind: bytes = tarfile.REGTYPE, link: str = "",
        size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if size is None and data is not None and kind == tarfile.REGTYPE else (size or 0)
    tf.addfile(info, io.BytesIO(data) if data is not None and kind == tarfile.REGTYPE else None)


def good_members(tf: tarfile.TarFile) -> None:
    add(tf, "bundle/manifest.json", b"{}")
    add(tf, "bundle/model.gguf", b"GGUF")


def evil_name() -> str:
    return f"edgekit-evil-{uuid.uuid4().hex[:12]}"


# name: (builder(tf, marker), fragments). ``marker`` is a unique file name the archive tries to plant.
ARCHIVES = {
    "dotdot": (lambda tf, m: add(tf, f"bundle/../../{m}"), ["'..' or backslash in the path"]),
    "absolute": (lambda tf, m: add(tf, f"/tmp/{m}"), ["absolute path"]),
    "symlink": (lambda tf, m: add(tf, "bundle/link", None, tarfile.SYMTYPE, "/etc/passwd"),
                ["'bundle/link'", "symbolic link (to '/etc/passwd')"]),
    "hardlink": (lambda tf, m: add(tf, "bundle/hard", None, tarfile.LNKTYPE, "/etc/passwd"),
                 ["'bundle/hard'", "hard link (to '/etc/passwd')"]),
    "char-device": (lambda tf, m: add(tf, "bundle/tty", None, tarfile.CHRTYPE), ["'bundle/tty'", "device or fifo"]),
    "fifo": (lambda tf, m: add(tf, "bundle/pipe", None, tarfile.FIFOTYPE), ["'bundle/pipe'", "device or fifo"]),
    "oversized-header": (lambda tf, m: add(tf, "bundle/huge.bin", None, size=100 * 2**30),  # header only, no data
                         ["'bundle/huge.bin'", "declares 107374182400 bytes", "byte limit"]),
    "duplicate": (lambda tf, m: add(tf, "bundle/model.gguf", b"other"),
                  ["'bundle/model.gguf'", "appears twice"]),
    "outside-top-folder": (lambda tf, m: add(tf, f"elsewhere/{m}"), ["outside the bundle's top folder 'bundle'"]),
    "too-many-members": (lambda tf, m: [add(tf, f"bundle/f{i}") for i in range(8)],
                         ["'bundle/f3'", "more than 5 members"]),
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Where an extraction could land: the temp dir, the cwd, and the folders around the archive; all watched."""
    scratch, cwd, inbox = tmp_path / "scratch", tmp_path / "cwd", tmp_path / "inbox" / "downloads"
    for d in (scratch, cwd, inbox):
        d.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    return {"scratch": scratch, "cwd": cwd, "inbox": inbox, "root": tmp_path}


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "edgekit-home" not in p.parts}


def assert_nothing_extracted(sandbox: dict, before: set[str], marker: str) -> None:
    assert listing(sandbox["root"]) == before, listing(sandbox["root"]) ^ before
    assert not list(sandbox["scratch"].iterdir()) and not list(sandbox["cwd"].iterdir())
    assert not Path("/tmp", marker).exists()


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_unsafe_archive_is_refused_by_member_and_nothing_is_extracted(capsys, home, sandbox, monkeypatch, case):
    monkeypatch.setattr("edgekit.package.check.MAX_TAR_MEMBERS", 5)
    build, fragments = ARCHIVES[case]
    marker = evil_name()
    tarball = sandbox["inbox"] / "bundle.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        good_members(tf)
        build(tf, marker)
    before = listing(sandbox["root"])
    line = assert_clean_failure(capsys, ["verify", tarball], [str(tarball), "is refused", *fragments,
                                                              "nothing was extracted"], watch=[tarball], home=home)
    assert "fetch it again" in line
    assert_nothing_extracted(sandbox, before, marker)


def test_too_many_members_stops_reading_at_the_first_one_over(capsys, home, sandbox, monkeypatch):
    """Headers are checked as they are read: an archive of a million members is refused after the limit, not read."""
    monkeypatch.setattr("edgekit.package.check.MAX_TAR_MEMBERS", 5)
    tarball = sandbox["inbox"] / "many.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        for i in range(50):
            add(tf, f"bundle/f{i}")
    seen = []
    original = tarfile.TarFile.next

    def counting(self):
        m = original(self)
        seen.append(m)
        return m

    monkeypatch.setattr(tarfile.TarFile, "next", counting)
    assert_clean_failure(capsys, ["verify", tarball], ["'bundle/f5'", "more than 5 members"], watch=[tarball],
                         home=home)
    assert {m.name for m in seen if m} == {f"bundle/f{i}" for i in range(6)}  # f6..f49 were never read


def gz(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members:
            add(tf, name, data)
    return buf.getvalue()


@pytest.mark.parametrize("case, contents, fragments", [
    ("truncated", lambda ok: ok[: len(ok) // 2], ["is a truncated or corrupt archive", "nothing was extracted",
                                                   "fetch it again"]),
    ("not-gzip", lambda ok: b"<html>404 Not Found</html>\n" * 20, ["is not a tar archive", "b'<html>40'",
                                                                    "pass a bundle folder"]),
    ("empty-file", lambda ok: b"", ["is not a tar archive", "pass a bundle folder"]),
    ("gzip-of-garbage", lambda ok: __import__("gzip").compress(b"garbage " * 200),
     ["is not a tar archive", "pass a bundle folder"]),
    ("empty-archive", lambda ok: gz([]), ["is an empty archive", "fetch the bundle again"]),
])
def test_damaged_archive_is_refused_in_one_line(capsys, home, sandbox, case, contents, fragments):
    ok = gz([(f"bundle/f{i}.bin", bytes(range(256)) * 40 + bytes([i])) for i in range(4)])
    tarball = sandbox["inbox"] / f"{case}.tar.gz"
    tarball.write_bytes(contents(ok))
    before = listing(sandbox["root"])
    assert_clean_failure(capsys, ["verify", tarball], [str(tarball), *fragments], watch=[tarball], home=home)
    assert_nothing_extracted(sandbox, before, "no-marker")


def tamper(folder: Path, how: str) -> None:
    if how == "altered-file":
        data = bytearray((folder / "model.gguf").read_bytes())
        data[100] ^= 0xFF  # same size, one byte flipped
        (folder / "model.gguf").write_bytes(bytes(data))
    elif how == "resized-file":
        (folder / "tokenizer.json").write_bytes(b"{}")
    elif how == "missing-file":
        (folder / "run_llamacpp.py").unlink()
    elif how == "unlisted-file":
        (folder / "payload.so").write_bytes(b"\x7fELF")
    elif how == "missing-manifest":
        (folder / "manifest.json").unlink()
    elif how == "manifest-not-json":
        (folder / "manifest.json").write_text("{not json")
    elif how == "manifest-unsafe-path":
        m = json.loads((folder / "manifest.json").read_text())
        m["files"]["../../outside.txt"] = {"sha256": "0" * 64, "size": 1}
        (folder / "manifest.json").write_text(json.dumps(m))


FOLDER_CASES = {
    "altered-file": ["model.gguf: sha256 mismatch (altered)"],
    "resized-file": ["tokenizer.json: size 2 !="],
    "missing-file": ["run_llamacpp.py: missing"],
    "unlisted-file": ["payload.so: not listed in manifest.json"],
    "missing-manifest": ["manifest.json: missing"],
    "manifest-not-json": ["manifest.json: unreadable"],
    "manifest-unsafe-path": ["../../outside.txt: unsafe path in manifest.json"],
}


def test_the_crafted_bundle_is_valid_before_it_is_damaged(capsys, home, tmp_path):
    folder = make_folder(tmp_path)
    tarball = tmp_path / "ok.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    for where in (folder, tarball):
        assert main(["verify", str(where)]) == 0
        assert "ok, 3 files verified" in capsys.readouterr().out


@pytest.mark.parametrize("as_tarball", [False, True], ids=["folder", "tarball"])
@pytest.mark.parametrize("how", list(FOLDER_CASES))
def test_damaged_bundle_names_the_file_and_the_fix(capsys, home, sandbox, how, as_tarball):
    folder = make_folder(sandbox["inbox"])
    tamper(folder, how)
    target = folder
    if as_tarball:
        target = sandbox["inbox"] / f"{folder.name}.tar.gz"
        with tarfile.open(target, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
    before = listing(sandbox["root"])
    line = assert_clean_failure(capsys, ["verify", target], [f"bundle {target} failed verification",
                                                             *FOLDER_CASES[how], "rebuild it with `edgekit package`"],
                                watch=[sandbox["inbox"]], home=home)
    assert line.count(";") >= 1
    assert_nothing_extracted(sandbox, before, "no-marker")  # a tarball's temporary extraction is gone too
    assert not (sandbox["inbox"].parent.parent / "outside.txt").exists()


def test_a_bundle_that_does_not_exist(capsys, home, tmp_path):
    assert_clean_failure(capsys, ["verify", tmp_path / "nope.tar.gz"],
                         ["nope.tar.gz does not exist", "pass a bundle folder or its .tar.gz"], home=home)
