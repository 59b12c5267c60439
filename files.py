"""Files written safely: atomically, one or several as a unit, with a full disk said in one line,
and the leftovers of writers that were killed removed by the next write into their folder.
"""
import contextlib
import errno
import os
import re

from errors import InputError

_TMP = re.compile(r'\..+\.(\d+)\.tmp')  # .NAME.PID.tmp: a file being written by process PID
_swept = set()  # folders whose dead writers' leftovers this process has removed


def process_alive(pid):
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Remove the `.NAME.PID.tmp` files in `folder` whose writer no longer runs (killed mid-write).
    Done once per folder and process, before its first write there."""
    folder = os.path.abspath(folder)
    if folder in _swept:
        return
    _swept.add(folder)
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = _TMP.fullmatch(name)
            if match and not process_alive(int(match[1])):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _no_space(path, error):
    """The one-line InputError for a full disk (or quota), else None."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(f'{path}: no space left on the device (the files there before are unchanged)')
    return None


@contextlib.contextmanager
def atomic_files(paths, mode='wb', durable=True):
    """Write several files through temporaries in their folders, then rename each to its path.

    Yields the open temporaries, in the order of `paths`. Every file is complete (on disk with
    `durable`) before the first rename, so a failure while writing, a full disk included, leaves
    every previous file as it was, and no temporary outlives this process unless it is killed
    (the next write into the folder removes those). A full disk raises InputError.
    """
    temporaries = []
    try:
        for path in paths:
            folder, name = os.path.split(path)
            os.makedirs(folder or '.', exist_ok=True)
            remove_stale_temporaries(folder or '.')
            temporaries.append(os.path.join(folder, f'.{name}.{os.getpid()}.tmp'))
        files = []
        try:
            for tmp in temporaries:
                files.append(open(tmp, mode))
            yield files
            for f in files:
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        finally:
            for f in files:
                f.close()
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
    except OSError as e:
        raise _no_space(' and '.join(paths), e) or e
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path, mode='wb', durable=True):
    """Write one file atomically (see atomic_files): the previous file or the new one, never half."""
    with atomic_files([path], mode, durable) as (f,):
        yield f
