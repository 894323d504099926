"""Atomic writes and safe loading of weights (used by models, engine and experiments alike).

- Model weights are safetensors; anything else goes through `torch.load(weights_only=True)`, which refuses
  pickles that would construct arbitrary objects. A refused or truncated file becomes a UserError naming it.
- Writes go to a temporary file in the same directory and are moved in place with `os.replace`, so a crash
  during a save leaves the previous file intact. The file gets the mode a plain `open()` would give it (0666 minus
  the umask), not mkstemp's 0600, so colleagues sharing a checkpoint or cache folder can read it.
- `content_hash(path)`: the sha256 prefix of a file's bytes, computed once per (path, size, mtime) and remembered
  (in memory and, when given, in a small JSON index): cache keys come from the weights actually loaded, never from
  what a `meta.json` claims.
- A full disk (or quota) during a write is one `DiskFull` line naming the file and the setting that moves its
  folder (`register_location`, filled by `ensure_dir`: paths.cache, paths.checkpoints, hydra.run.dir); temp names
  carry the writer's host and pid, so the next start removes a killed writer's leftovers (`remove_stale_temps`).
- A file that cannot be read (permissions) is named as such, never as "corrupt"; readability and writability are
  probed with a real open / create (`check_readable`, `write_probe`), never os.access, which says yes to root.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict

import torch

from .errors import UserError

log = logging.getLogger(__name__)


class DiskFull(UserError, OSError):
    """A write that failed for want of space (or quota): one line naming the path and the setting that moves it.
    Also an OSError with errno ENOSPC, so code that tolerates a failed write (`except OSError`) still does."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def temp_tag() -> str:
    """`kt-<host>-<pid>`: written into every temporary name, so a later start can tell a dead writer's leftover
    (removed) from a live one's (kept)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"kt-{host}-{os.getpid()}"


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically. A full disk during the
    write is a DiskFull line naming `path` (the writers say it their own way: torch's zip writer only says
    "unexpected pos"); the temporary file is removed, the previous `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_tag()}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        if disk_full(e):
            raise disk_full_error(path, e) from e
        raise UserError(f"cannot write {path} ({os_reason(e)}): {_dir_fix(path.parent)}") from e
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after the write: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, UserError) and disk_full(e, path.parent)  # free space is read before the unlink
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise disk_full_error(path, e) from e
        raise


# ------------------------------------------------------------------------------------- full disks, settings

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_LOCATIONS: Dict[str, str] = {}  # resolved folder -> the setting that moves it (filled by ensure_dir)


def disk_full(e: BaseException, folder=None) -> bool:
    """Whether `e` means the disk (or quota) is full: an OSError's errno, the words a wrapping library kept
    (safetensors: "os error 28"), or, for a writer that says neither (torch's "unexpected pos"), under 1 MiB free
    at `folder` right after the failure."""
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
        return True
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: never a full disk
        return False
    if any(t in str(e) for t in _FULL_TEXT):
        return True
    return folder is not None and isinstance(e, RuntimeError) and free_bytes(folder) < (1 << 20)


def free_bytes(folder) -> int:
    """Bytes an unprivileged writer may still use at `folder` (its nearest existing parent); huge when unknown."""
    for p in [Path(folder), *Path(folder).parents]:
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return 1 << 62


def register_location(folder, key: str) -> None:
    """Remember that `folder` is where setting `key` points (paths.cache, hydra.run.dir, ...), for messages."""
    try:
        _LOCATIONS[str(Path(folder).resolve())] = key
    except OSError:
        pass


def setting_for(path) -> "str | None":
    """The setting that moves `path`: the registered folder that holds it most closely."""
    try:
        p = Path(path).resolve()
    except OSError:
        return None
    best = None
    for folder, key in _LOCATIONS.items():
        f = Path(folder)
        if (p == f or f in p.parents) and (best is None or len(folder) > len(best[0])):
            best = (folder, key)
    return best[1] if best else None


def disk_full_error(path, e: BaseException) -> DiskFull:
    key = setting_for(path)
    move = f"set {key}=<a folder on a disk with space>" if key else "write it to a disk with space"
    return DiskFull(f"no space left on the device while writing {path} ({type(e).__name__}: "
                    f"{os_reason(e) if isinstance(e, OSError) else str(e)[:80]}; {free_bytes(Path(path).parent):,} "
                    f"bytes free there): free space on that disk or {move} (the previous file, if any, is intact)")


def as_user_error(e: BaseException) -> BaseException:
    """A full disk met outside the atomic writers (an append, a mkdir) as its DiskFull line; anything else as is."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and disk_full(e):
        return disk_full_error(e.filename or "a file", e)
    return e


# ------------------------------------------------------------------------------- leftovers of killed writes

_TAGGED = re.compile(r"^\..+\.kt-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
_UNTAGGED = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_path's names before the tag
_SWEPT: set = set()
SWEEP_DEPTH, SWEEP_BUDGET = 4, 100_000  # levels below the folder, entries looked at
STALE_AFTER_S = 24 * 3600  # an untagged (or other host's) temp file older than this is a leftover anywhere


def remove_stale_temps(folder, exclusive: bool = False) -> list:
    """Delete the temporary files of atomic saves that a killed or crashed process left below `folder`; the
    paths removed. A temp file is a leftover when its writer (host, pid in its name) is this host's and dead, or
    it is older than a day; with `exclusive` (the caller holds the folder's lock: a run dir) every one is."""
    removed, here, seen = [], temp_tag().split("-")[1], 0
    top = len(Path(folder).parts)
    for root, dirs, files in os.walk(folder):
        seen += len(files) + len(dirs)
        if len(Path(root).parts) - top >= SWEEP_DEPTH or seen > SWEEP_BUDGET:
            dirs[:] = []  # checkpoint and cache files sit 1-4 levels down; never crawl a data tree put here
        for name in files:
            m = _TAGGED.match(name)
            if not m and not _UNTAGGED.match(name):
                continue
            p = Path(root) / name
            if exclusive or _is_leftover(p, m, here):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves below %s (e.g. %s)", len(removed), folder,
                 removed[0].name)
    return removed


def _is_leftover(p: Path, m, host: str) -> bool:
    try:
        old = time.time() - p.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False
    if m is None or m["host"] != host:
        return old
    return old or not _alive(int(m["pid"]))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def umask() -> int:
    """The process umask (read without changing it where /proc allows; os.umask otherwise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _dir_fix(folder: Path) -> str:
    """The fix for a folder that cannot be created or written: name the part of the path that is in the way."""
    for p in [folder, *folder.parents]:
        if p.exists():
            if not p.is_dir():
                return f"{p} is a regular file, not a folder: move it away or point the path elsewhere"
            if write_probe(p) is not None:
                return f"{p} is not writable by you: fix its permissions or point the path elsewhere"
            break
    return "point the path at a writable folder"


SWEPT_KEYS = ("hydra.run.dir", "paths.checkpoints", "paths.cache")  # folders of atomic saves (not paths.data)


def ensure_dir(folder, key: str) -> Path:
    """Create `folder` (the value of config key `key`) or fail with one line naming what is in the way. The folder
    is remembered as `key`'s (a full disk there names `key`), and, once per process, the leftovers of saves a
    killed run interrupted below it are removed (`remove_stale_temps`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if disk_full(e):
            raise disk_full_error(folder, e) from e
        raise UserError(f"{key}={folder} cannot be created ({os_reason(e)}): {_dir_fix(folder)}") from e
    denied = write_probe(folder)
    if denied is not None:
        if disk_full(denied):
            raise disk_full_error(folder, denied) from denied
        raise UserError(f"{key}={folder} is not writable by you ({os_reason(denied)}): fix its permissions "
                        f"(e.g. chmod u+rwx {folder}) or set {key}=<a writable folder>")
    register_location(folder, key)
    if key in SWEPT_KEYS and str(folder.resolve()) not in _SWEPT:
        _SWEPT.add(str(folder.resolve()))
        remove_stale_temps(folder)
    return folder


def write_probe(folder) -> "OSError | None":
    """None when a file can be created in `folder`, else the error that refused it. A real create (and unlink)
    rather than os.access: access() answers yes to root for any mode, and no for some mounts, ACLs or network
    file systems whose writes would succeed or fail otherwise."""
    probe = Path(folder) / f".kt_write_probe.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


def read_json_safe(path, what: str = "file", fix: str = "delete it and rerun") -> Any:
    """JSON from `path`, or one UserError naming the file (missing, unreadable, a folder, torn or not JSON)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a JSON file: {fix}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise UserError(f"{what} {path} does not exist: {fix}") from e
    except PermissionError as e:
        raise UserError(f"{what} {path} is not readable (permission denied): ask its owner to chmod a+r it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}): {fix}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is corrupt: torn or not JSON ({e.msg} at line {e.lineno}): {fix}") from e


def write_json(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_safetensors(state: Dict[str, torch.Tensor], path, metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clone to plain contiguous CPU tensors
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def torch_save(obj: Any, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_readable(path, what: str = "checkpoint") -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file: give the weights file inside it")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    try:  # a real open, not os.access: access() answers yes to root for any mode
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError as e:
        raise UserError(f"{what} {path} is not readable ({os_reason(e)}): ask its owner to chmod a+r it (the "
                        f"file itself may be fine)") from e
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({os_reason(e)}): check the disk or copy it again") from e
    return path


def load_state_dict(path, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or a torch file loaded with weights_only=True (never executes code).
    Accepts the usual wrappers ({'state_dict': ...}, {'model': ...}). `what` names the file in messages."""
    path = check_readable(path, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return check_finite(load_file(str(path)), path, what)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{what} {path} is corrupt or truncated ({type(e).__name__}): re-download or "
                            f"retrain it") from e
    obj = safe_torch_load(path, what=what)
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} {path} holds no state dict of tensors: save model.state_dict()")
    return check_finite({k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}, path, what)


def check_finite(state: Dict[str, torch.Tensor], path, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """`state` when every floating-point weight is finite; else one line naming the file and the first bad key (a
    diverged or damaged file would otherwise load, have its outputs cached and fail later in a method's loss).
    Mask buffers (-inf by design in some attention models) may hold infinities, never NaN."""
    for k, v in state.items():
        if not v.is_floating_point() or bool(torch.isfinite(v).all()):
            continue
        if "mask" in k.lower() and not bool(torch.isnan(v).any()):
            continue
        bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        raise UserError(f"{what} {path} holds non-finite weights ({len(bad)} tensor(s), first '{k}': "
                        f"{int((~torch.isfinite(v)).sum())} of {v.numel()} values NaN/inf): it was saved from a "
                        f"diverged run or is damaged; retrain it or use another file")
    return state


def safe_torch_load(path, map_location="cpu", what: str = "checkpoint"):
    import warnings

    check_readable(path, what)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text or "unsupported GLOBAL" in text or _constructs_objects(path):
            raise UserError(f"refusing to load {path}: its pickle would construct arbitrary objects; convert it "
                            f"to safetensors where you trust it") from e
        raise UserError(f"{what} {path} is corrupt or truncated, or not a torch file ({type(e).__name__}): "
                        f"re-download or retrain it") from e


_HASHES: Dict[tuple, str] = {}


def content_hash(path, index=None, n: int = 16) -> str:
    """`file_hash(path)`, computed once per (resolved path, size, mtime) and remembered in memory and, when `index`
    (a JSON file, e.g. in the cache folder) is given, across runs. A replaced file has another size or mtime, so it
    is hashed again."""
    path = check_readable(path, "weights file")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, n)
    if key in _HASHES:
        return _HASHES[key]
    book = {}
    if index is not None and Path(index).is_file():
        try:
            book = json.loads(Path(index).read_text())
        except (OSError, ValueError):
            book = {}  # a torn index is only a lost memo
        got = book.get(key[0]) if isinstance(book, dict) else None
        if isinstance(got, list) and got[:3] == [st.st_size, st.st_mtime_ns, n]:
            _HASHES[key] = str(got[3])
            return _HASHES[key]
    h = file_hash(path, n)
    _HASHES[key] = h
    if index is not None:
        try:
            book = book if isinstance(book, dict) else {}
            book[key[0]] = [st.st_size, st.st_mtime_ns, n, h]
            write_json(index, book)
        except (OSError, UserError):
            pass  # the memo is an optimisation; an unwritable cache folder is reported where it is used
    return h


def _constructs_objects(path) -> bool:
    """True when `path` is a complete plain pickle that imports names (GLOBAL/STACK_GLOBAL/INST): what
    weights_only refuses as unsafe, as opposed to bytes that are no pickle at all. Parsed, never executed."""
    import pickletools

    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                return False
            f.seek(0)
            names = {op.name for op, _, _ in pickletools.genops(f)}
    except Exception:
        return False
    return bool(names & {"GLOBAL", "STACK_GLOBAL", "INST"})


def file_hash(path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]
