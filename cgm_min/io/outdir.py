"""An output folder that appears whole or not at all.

    with AtomicOutputDir("merged", overwrite=False) as out:
        fd = out.create("model.safetensors")      # write into fd ...
        out.write_text("config.json", text)
        out.stage()                               # every file gets its name in a hidden folder beside OUT_DIR
        ...                                       # (verify the staged folder: out.staging)
    # leaving the block without an exception renames the staged folder to OUT_DIR; with one, removes it

    with AtomicOutputDir("runs/x/merge", staging_name=".merge.partial") as out:
        folder = out.tree()                       # a named hidden folder: write any tree into it by path
        (folder / "a").mkdir(); (folder / "a" / "b.json").write_text("{}")

Files are created with O_TMPFILE in OUT_DIR's parent folder: until `stage()` links them into the hidden
staging folder `.<name>.cgm-tmp-<pid>` they have no name, so a process killed at any point of the long
writing phase (kill -9 included) leaves nothing behind: the kernel frees unnamed files with their last
descriptor. Only a kill between `stage()` and the final rename (the verification) can leave the staging
folder, with complete files in it; the next `AtomicOutputDir` beside it removes staging folders whose
process is gone. Where O_TMPFILE is not supported, files are created by name in the staging folder
from the start (the same clean-up then covers a kill during writing).

A tree (folders, files written by path, other writers' output folders) goes into the staging folder that
`tree()` names and returns; such files have names from the start, so a kill can leave that folder behind:
it is removed by the next `AtomicOutputDir` of the same OUT_DIR (a staging folder of a dead process, or the
fixed `staging_name` one, which several processes of one run can share, as the reproduction chain's
processes share a step's folder).

An existing OUT_DIR is refused unless `overwrite=True`; it is then replaced only at the very end (renamed
aside, the new folder renamed in, the old one removed). Files are not fsync'ed: a power cut may lose data,
a crashed or killed process cannot leave a half-written OUT_DIR.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

STAGING = ".{name}.cgm-tmp-{pid}"
_STALE = re.compile(r"^\.(?P<name>.+)\.cgm-(tmp|old)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove staging folders of `name` in `parent` left by processes that no longer run."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _STALE.match(p.name)
        if m and m["name"] == name and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class AtomicOutputDir:
    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False, staging_name: str | None = None):
        """`staging_name`: a fixed name for the hidden staging folder beside OUT_DIR (default
        .<name>.cgm-tmp-<pid>), for a folder that several processes write into."""
        if staging_name is not None and (not staging_name.startswith(".") or "/" in staging_name
                                         or staging_name in (".", "..")):
            raise ValueError(f"staging_name must be a hidden file name, got {staging_name!r}")
        self.out = Path(os.path.abspath(out_dir))
        self.overwrite = overwrite
        if self.out.exists() or self.out.is_symlink():
            if not self.out.is_dir() or self.out.is_symlink():
                raise FileExistsError(f"{self.out} exists and is not a folder; choose another output folder")
            if not overwrite:
                raise FileExistsError(f"output folder {self.out} exists; pass --overwrite to replace it")
        self.parent = self.out.parent
        self.staging = self.parent / (staging_name or STAGING.format(name=self.out.name, pid=os.getpid()))
        self._fixed = staging_name is not None
        self._prepared = False
        self._made_parents: list[Path] = []
        self._fds: dict[str, int] = {}
        self._named: set[str] = set()
        self._tmpfile = hasattr(os, "O_TMPFILE")
        self.staged = self.done = False

    # -- creating files ---------------------------------------------------------------------------------
    def _ensure_parent(self) -> None:
        if self.parent.is_dir():
            return
        missing, p = [], self.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is not a folder; cannot create {self.out}")
        for d in reversed(missing):
            d.mkdir()
            self._made_parents.append(d)

    def _ensure_staging(self) -> None:
        if not self.staging.exists():
            self.staging.mkdir()

    def _prepare(self) -> None:
        """Before the first file: OUT_DIR's parent made, what earlier runs left removed (staging folders of
        processes that are gone; a fixed staging folder whatever made it)."""
        if self._prepared:
            return
        self._ensure_parent()
        remove_stale(self.parent, self.out.name)
        if self._fixed and (self.staging.exists() or self.staging.is_symlink()):
            if self.staging.is_dir() and not self.staging.is_symlink():
                shutil.rmtree(self.staging)
            else:
                self.staging.unlink()
        self._prepared = True

    def tree(self) -> Path:
        """The staging folder, created now: write files and folders into it by path (or let other code write
        its output folders there); `commit` renames it to OUT_DIR with everything in it."""
        self._prepare()
        self._ensure_staging()
        return self.staging

    def create(self, name: str) -> int:
        """A new, empty file `name` open for reading and writing; returns its file descriptor."""
        if name in self._fds or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"cannot create output file {name!r}")
        self._prepare()
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if self._tmpfile:
            try:
                fd = os.open(self.parent, flags | os.O_TMPFILE, 0o644)
                self._fds[name] = fd
                return fd
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                self._tmpfile = False
        self._ensure_staging()
        fd = os.open(self.staging / name, flags | os.O_CREAT | os.O_EXCL, 0o644)
        self._fds[name] = fd
        self._named.add(name)
        return fd

    def write_bytes(self, name: str, data: bytes) -> None:
        from .writer import write_all
        write_all(self.create(name), memoryview(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def copy_file(self, name: str, src: Path) -> None:
        fd = self.create(name)
        with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb", closefd=True) as g:
            shutil.copyfileobj(f, g, 8 << 20)

    @property
    def names(self) -> list[str]:
        return list(self._fds)

    def fd(self, name: str) -> int:
        return self._fds[name]

    # -- finishing --------------------------------------------------------------------------------------
    def stage(self) -> Path:
        """Give every file its name inside the hidden staging folder (returned)."""
        self._ensure_parent()
        self._ensure_staging()
        proc = None
        try:
            for name, fd in self._fds.items():
                if name not in self._named:
                    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE file; os.link calls
                    # plain link() (which would link the symlink itself) unless given a dir fd
                    proc = proc if proc is not None else os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
                    os.link(str(fd), self.staging / name, src_dir_fd=proc, follow_symlinks=True)
                    self._named.add(name)
        finally:
            if proc is not None:
                os.close(proc)
        self.staged = True
        return self.staging

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def commit(self) -> Path:
        """Rename the staged folder to OUT_DIR (replacing an existing one when overwrite=True, through
        `report.replace_dir`: the old folder is put back if the new one cannot be renamed in)."""
        from ..report import replace_dir
        if not self.staged:
            self.stage()
        self._close_fds()
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"output folder {self.out} appeared while merging; nothing was replaced")
        replace_dir(self.staging, self.out)
        self.done = True
        return self.out

    def abort(self) -> None:
        """Remove everything written: unnamed files vanish with their descriptors, named ones are deleted."""
        self._close_fds()
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        for d in reversed(self._made_parents):
            try:
                d.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self.done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        elif exc_type is not None:
            self.abort()
        return False
