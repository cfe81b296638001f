"""Check a bundle received: a folder or a ``.tar.gz`` against the hashes in its manifest.

A tarball's members are all checked before anything is extracted (no absolute paths, ``..``, links,
devices, members outside one top folder, more than ``MAX_TAR_MEMBERS`` members or more than
``max_bytes`` in total), each header as soon as it is read; it is then extracted into a temporary
folder with tarfile's ``data`` filter as a second line of defence, and verified like a folder: every
listed file present with the right size and sha256, and no unlisted file.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from edgekit import artifact
from edgekit.errors import ConfigError

SCHEMA = "edgekit.bundle/1"
MANIFEST = artifact.MANIFEST
MAX_TAR_BYTES = 64 * 2**30  # verify() refuses archives whose members add up to more than this
MAX_TAR_MEMBERS = 10_000  # ... or that hold more members than this (a bundle has about a dozen files)


def verify(bundle: Path, *, strict: bool = True, max_bytes: int = MAX_TAR_BYTES) -> dict:
    """Check a bundle folder or ``.tar.gz``; returns ``{"ok", "path", "files", "problems"}``.

    ``files`` lists the manifest's files; ``problems`` names each file that is missing, resized,
    altered or unlisted. With ``strict`` (the default) any problem raises ConfigError instead.
    An archive with an unsafe member (absolute path, ``..``, link, device, outside the one top folder,
    over ``max_bytes`` in total) always raises ConfigError, and nothing is extracted.
    """
    bundle = Path(bundle)
    if bundle.is_dir():
        result = _verify_folder(bundle)
    elif bundle.is_file():
        result = _verify_tarball(bundle, max_bytes)
    else:
        raise ConfigError(f"{bundle} does not exist; pass a bundle folder or its .tar.gz made by `edgekit package`")
    result = {"ok": not result["problems"], "path": str(bundle), **result}
    if strict and result["problems"]:
        raise ConfigError(f"bundle {bundle} failed verification: {'; '.join(result['problems'][:5])}"
                          f"{' ...' if len(result['problems']) > 5 else ''}; rebuild it with `edgekit package` or "
                          "fetch an intact copy")
    return result


def _verify_tarball(path: Path, max_bytes: int) -> dict:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # EOFError: a gzip stream cut short
        head = b""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(8)
        raise ConfigError(f"{path} is not a tar archive (gzip, xz, bz2 or plain; it starts with {head!r}); pass a "
                          "bundle folder or the .tar.gz `edgekit package` wrote") from e
    with tf:
        try:  # each header is checked as soon as it is read: a hostile member stops the reading right there
            top = check_members(tf, path, max_bytes)
            members = tf.getmembers()  # all read by now
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ConfigError(f"{path} is a truncated or corrupt archive ({' '.join(str(e).split())}); nothing was "
                              "extracted; fetch it again") from e
        with tempfile.TemporaryDirectory(prefix="edgekit-verify-") as tmp:
            try:
                tf.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise ConfigError(f"{path}: extracting failed ({e}); the archive is corrupt, fetch it again") from e
            return _verify_folder(Path(tmp) / top)


def check_members(members: Iterable[tarfile.TarInfo], path: Path, max_bytes: int = MAX_TAR_BYTES,
                  max_members: int | None = None) -> str:
    """Refuse an archive unless every member is a plain file or folder under one top folder; returns that folder.

    ``members`` may be an open TarFile: its headers are then checked one by one as they are read,
    so an archive with a hostile header (or millions of members) is refused without reading on.
    """
    def refuse(member: str, reason: str) -> ConfigError:
        return ConfigError(f"{path}: member {member!r} is refused: {reason}; nothing was extracted -- this is not an "
                           "intact edgekit bundle, fetch it again from a trusted source")

    max_members = max_members or MAX_TAR_MEMBERS
    top, total, seen = None, 0, set()
    for m in members:
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or PurePosixPath(name).is_absolute():
            raise refuse(name, "absolute path")
        if ".." in parts or "\\" in name:
            raise refuse(name, "'..' or backslash in the path")
        if m.issym():
            raise refuse(name, f"symbolic link (to {m.linkname!r})")
        if m.islnk():
            raise refuse(name, f"hard link (to {m.linkname!r})")
        if m.ischr() or m.isblk() or m.isfifo():
            raise refuse(name, "device or fifo")
        if not (m.isfile() or m.isdir()):
            raise refuse(name, "not a regular file or folder")
        if not parts or (len(parts) == 1 and not m.isdir()):
            raise refuse(name, "outside the bundle's top folder")
        if top is None:
            top = parts[0]
        elif parts[0] != top:
            raise refuse(name, f"outside the bundle's top folder {top!r}")
        if name in seen:
            raise refuse(name, "appears twice (a later copy would overwrite the first)")
        seen.add(name)
        if len(seen) > max_members:
            raise refuse(name, f"the archive holds more than {max_members} members (a bundle has about a dozen)")
        total += m.size
        if m.size > max_bytes or total > max_bytes:
            raise refuse(name, f"it declares {m.size} bytes and the archive's members exceed the {max_bytes} byte "
                               "limit (raise it with `edgekit verify --max-size` if the bundle is genuinely that large)")
    if top is None:
        raise ConfigError(f"{path} is an empty archive; fetch the bundle again")
    return top


def _verify_folder(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"files": [], "problems": [f"{MANIFEST}: missing"]}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {"files": [], "problems": [f"{MANIFEST}: unreadable ({e})"]}
    valid = isinstance(manifest, dict) and manifest.get("schema") == SCHEMA and isinstance(manifest.get("files"), dict)
    if not valid:
        return {"files": [], "problems": [f"{MANIFEST}: not an {SCHEMA} manifest with a files table"]}
    listed, problems = manifest["files"], []
    for rel, meta in listed.items():
        p = folder / rel
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            problems.append(f"{rel}: unsafe path in {MANIFEST}")
        elif p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: missing")
        elif not isinstance(meta, dict) or p.stat().st_size != meta.get("size"):
            problems.append(f"{rel}: size {p.stat().st_size} != {meta.get('size') if isinstance(meta, dict) else '?'}")
        elif artifact.sha256_file(p) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (altered)")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in {MANIFEST}")
    return {"files": sorted(listed), "problems": problems}
