"""Files that appear whole or not at all: written to a hidden temporary beside the target, renamed into place.

A temporary is named .<name>.<pid>@<host>.<random>.tmp<ext>, so that a later run in the same directory removes
those that a process of this host left behind when it was killed outright (SIGKILL, power loss). Used by
io.writer.NiftiWriter (every NIfTI output) and by the command's --preview PNG.
"""
import errno
import os
import re
import socket
import tempfile

# A temporary output is hidden and says which process made it: .<name>.<pid>@<host>.<mkstemp's 8>.tmp<ext>
_TEMPORARY = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[a-z0-9_]{8}\.tmp(\.nii|\.nii\.gz|\.png)$")
_swept = set()   # directories whose stale temporaries this process has removed already


def _temporary_tag(pid=None):
    """'<pid>@<host>' for a temporary file's name (the host name reduced to letters, digits and '-')."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
    return f"{os.getpid() if pid is None else pid}@{host}"


def temporary(directory, name, ext):
    """(fd, path) of a new hidden temporary file in `directory` for the output `name` (ending in `ext`), named so
    that a later run can recognise it. First removes, once per directory per process, the temporaries that
    processes of this host left behind when they were killed outright (SIGKILL, power loss): the pid in their
    name is no longer running. Another host's pid means nothing here, so its temporaries are left alone (and
    every reader of a directory skips hidden files)."""
    key = os.path.realpath(directory)
    if key not in _swept and os.name == "posix":   # os.kill(pid, 0) only asks on POSIX (Windows would kill)
        _swept.add(key)
        _remove_stale_temporaries(directory, _temporary_tag().split("@", 1)[1])
    return tempfile.mkstemp(prefix=f".{name[:-len(ext)]}.{_temporary_tag()}.", suffix=f".tmp{ext}",
                            dir=directory)


def _remove_stale_temporaries(directory, host):
    try:
        entries = [e.name for e in os.scandir(directory) if e.name.startswith(".")]
    except OSError:
        return
    for entry in entries:
        found = _TEMPORARY.search(entry)
        if found is None or found["host"] != host or _running(int(found["pid"])):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: it runs, as another user
        return True
    return True


def link_no_clobber(tmp, path):
    """Move tmp to path unless path exists, atomically where the file system has hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", path) from None
    except OSError:  # no hard links here (some network / FAT file systems): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly)
    os.umask(mask)
    return mask


def new_file_mode():
    """The mode a new file gets here (0o666 less the umask): what a temporary made private by mkstemp is given
    before it becomes the output."""
    return 0o666 & ~_umask()


def fsync_directory(directory):
    """Make the rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
