"""How much memory this process can still allocate, and the refusal of a call that needs more.

The ops estimate what a call will allocate from its geometry alone and ask `require` before allocating any of
it, so that a call that cannot fit fails at once with a MemoryError that says why, instead of swapping for
minutes, being killed by the kernel's OOM killer, or (a buffer allocated inside a parallel region) crashing.
"""
import os

# Below this, a call is not checked: reading /proc costs more than such an allocation, and a failure that
# small is a numpy MemoryError (or the kernels' own) anyway.
CHECK_ABOVE = 64 * 2**20


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _meminfo_available():
    """MemAvailable (free memory plus what the kernel can reclaim without swapping), in bytes."""
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:   # other POSIX systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available(root="/sys/fs/cgroup"):
    """The least headroom (limit less the usage the kernel cannot reclaim) of this process's memory cgroup and
    its ancestors (containers, batch schedulers), or None without a limit. cgroup v2 and v1."""
    v2 = ("memory.max", "memory.current", "inactive_file")
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    best = None
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, names = root, v2
        elif "memory" in controllers.split(","):
            base, names = os.path.join(root, "memory"), v1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):   # the cgroup, then its ancestors (a limit may sit higher)
            here = os.path.join(base, *parts[:depth])
            limit, usage = _read(os.path.join(here, names[0])), _read(os.path.join(here, names[1]))
            if limit is None or usage is None or not limit.strip().isdigit():   # "max": no limit here
                continue
            limit = int(limit)
            if limit >= 2**60:   # v1's "no limit"
                continue
            inactive = 0   # page cache the kernel reclaims before failing an allocation
            for stat in (_read(os.path.join(here, "memory.stat")) or "").splitlines():
                key, _, value = stat.partition(" ")
                if key == names[2]:
                    inactive = int(value)
            headroom = limit - max(int(usage) - inactive, 0)
            best = headroom if best is None else min(best, headroom)
    return best


def _address_space_available():
    """What `ulimit -v` (RLIMIT_AS) still allows this process to map, or None without a limit."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmSize:"):
            return soft - int(line.split()[1]) * 1024
    return soft


def available():
    """Bytes this process can still allocate: the least of the machine's available memory, its memory cgroup's
    headroom and its address-space limit; None when none of them can be read."""
    known = [n for n in (_meminfo_available(), _cgroup_available(), _address_space_available()) if n is not None]
    return max(min(known), 0) if known else None


def size(nbytes):
    """nbytes for a message: '3.2 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes / 2**10:.3g} KiB" if nbytes >= 2**10 else f"{nbytes} bytes"


def fits(nbytes):
    """Whether nbytes (a call's estimate) is within what this process can still allocate (or too small to
    check, or nothing can be read)."""
    if nbytes <= CHECK_ABOVE:
        return True
    free = available()
    return free is None or nbytes <= free


def require(nbytes, what, hint=""):
    """Raise MemoryError when nbytes (a call's estimate, made before it allocates) is more than this process
    can still allocate. what: what needs it, with the arguments that make it that large; hint: what to do."""
    if not fits(nbytes):
        raise MemoryError(f"{what} needs {size(nbytes)}, but only {size(available())} of memory is "
                          f"available{hint}")
