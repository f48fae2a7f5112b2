"""
Atomic writes: every file and folder this package writes appears whole or not at all.

A file is written under a temporary name beside it and renamed over it (os.replace is atomic within one file
system). A folder is built as a temporary folder beside it; replacing an existing one moves the old one aside,
renames the new one in, and only then removes the old one, so no failure or kill loses the old folder before the
new one is complete. Everything is created with plain open/mkdir, so permissions follow the umask (tempfile's
mkstemp/mkdtemp would make them private, and the rename would keep that).

Temporary names are `.<name>.tmp-<host>-<pid>-<random>` (an old folder moved aside: `.old-` instead of `.tmp-`):
every write cleans up what a killed process of this host (its pid no longer runs) left in its folder: it removes
its temporaries, and puts back an old folder that a kill between the two renames of a swap left aside. It never
touches a live writer's names, nor a name of any other shape.

Replacing a folder deletes the old one, so it is refused for what the program did not create: the working
directory or any folder above it, a source being read or any folder above one, a file, and any non-empty folder
the caller's `owned` check does not recognise as its own output.

Stdlib only: tokenizer.py imports it, so it travels in exported remote-code folders.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Iterator

HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_path(dest: str, pid: int | None = None, kind: str = "tmp") -> str:
    """A fresh temporary name beside dest, marked with this host and process; kind "old": an old dest moved aside."""
    folder, name = os.path.split(os.path.abspath(dest))
    pid = os.getpid() if pid is None else pid
    return os.path.join(folder, f".{name}.{kind}-{HOST}-{pid}-{os.urandom(4).hex()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere there is no harmless liveness probe: keep it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def clean_stale(folder: str) -> None:
    """Undo what a killed writer of this host left in folder (ours by name; their process is gone): remove its
    temporaries, and put an old folder moved aside back in place if nothing replaced it."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = TEMP_NAME.match(name)
        if not m or m["host"] != HOST or _alive(int(m["pid"])):
            continue
        path, dest = os.path.join(folder, name), os.path.join(folder, m["dest"])
        if m["kind"] == "old" and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                os.rename(path, dest)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _fsync(path: str) -> None:
    """Flush a file (or a folder's entries) to disk where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# files

@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs) -> Iterator:
    """open(path, mode) on a temporary beside path that replaces it once the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    clean_stale(os.path.dirname(os.path.abspath(path)))
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """JSON with indent 2 and a final newline, as transformers writes its config files."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# folders

def _settle(folder: str) -> None:
    """Give everything in a new folder the umask's permissions (some writers, safetensors among them, make their
    files private) and flush it to disk. The folder itself was made by os.mkdir, so its mode is the umask's."""
    dir_mode = stat.S_IMODE(os.stat(folder).st_mode)
    file_mode = dir_mode & 0o666
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
                _fsync(path)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_replaceable(out_dir: str, overwrite: bool, owned: Callable[[str], bool] | None = None,
                      sources: Iterable[str | None] = ()) -> None:
    """Raise unless out_dir is absent, or overwrite is on and out_dir may be deleted (see the module docstring)."""
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    refuse = f"refusing to replace {out_dir}"
    if os.path.islink(out_dir):
        raise ValueError(f"{refuse}: it is a symbolic link; name the folder itself, or a new folder")
    real = os.path.realpath(out_dir)
    if _within(os.path.realpath(os.getcwd()), real):
        raise ValueError(f"{refuse}: it is the current directory or a folder above it; write to a new folder")
    for src in sources:
        if src and os.path.exists(src) and _within(os.path.realpath(src), real):
            raise ValueError(f"{refuse}: it is the source {src} or a folder above it; write to a new folder")
    if not os.path.isdir(real):
        raise ValueError(f"{refuse}: it is a file this program did not write; remove it yourself or pick a new name")
    if os.listdir(real) and not (owned is not None and owned(real)):
        raise ValueError(f"{refuse}: it holds files this program did not write; remove it yourself or write to a "
                         "new folder")


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False, owned: Callable[[str], bool] | None = None,
                  sources: Iterable[str | None] = ()) -> Iterator[str]:
    """
    Yield a temporary folder beside out_dir that becomes out_dir when the block ends without an error, and
    vanishes otherwise. overwrite: an existing out_dir may be replaced, if check_replaceable allows it.
    """
    out_dir, sources = os.path.abspath(out_dir), tuple(sources)
    parent = os.path.dirname(out_dir)
    clean_stale(parent)  # first: it may put back an old out_dir
    check_replaceable(out_dir, overwrite, owned, sources)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_path(out_dir)
    os.mkdir(tmp)
    try:
        yield tmp
        _settle(tmp)
        check_replaceable(out_dir, overwrite, owned, sources)  # again: the block may have run for hours
        old = None
        if os.path.lexists(out_dir):
            old = temp_path(out_dir, kind="old")
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)  # put the old folder back
            raise
        if old is not None:
            shutil.rmtree(old)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
