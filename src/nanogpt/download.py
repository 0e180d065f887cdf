"""Checked downloads: a file is fetched once, from a local mirror when one is set, and kept only
when its sha256 is the published one.

Offline, point ``NANOGPT_DATA_MIRROR`` (or a command's ``--mirror``) at a folder holding the same
files under the same relative paths (``tinyshakespeare/input.txt``, ``gpt2-bpe/encoder.json``, ...).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request

from .errors import PrepareError


def _log(msg: str) -> None:
    print(msg, flush=True)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mirror_dir(mirror: str | None = None) -> str | None:
    """The local mirror folder: the argument, else $NANOGPT_DATA_MIRROR, else None."""
    return mirror or os.environ.get("NANOGPT_DATA_MIRROR") or None


def fetch(url: str, dest: str, sha256: str, mirror_relpath: str, mirror: str | None = None) -> str:
    """Make ``dest`` hold the file published at ``url``, whose sha256 is ``sha256``.

    An existing ``dest`` with that hash is kept. Otherwise the file is copied from
    ``<mirror>/<mirror_relpath>`` when a mirror is configured (``mirror`` or
    $NANOGPT_DATA_MIRROR) and holds it, else downloaded. The copy goes to a temporary file beside
    ``dest``, is checked, and only then renamed into place: a failure leaves no file behind
    (and an existing ``dest`` untouched). Returns ``dest``.
    """
    name = os.path.basename(dest)
    if os.path.isfile(dest):
        got = sha256_of(dest)
        if got == sha256:
            return dest
        _log("%s has sha256 %s, not the expected %s: fetching a fresh copy" % (dest, got[:16], sha256[:16]))
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    mdir = mirror_dir(mirror)
    mirror_file = os.path.join(mdir, mirror_relpath) if mdir else None
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            origin = _copy_from(url, out, mirror_file, mdir, mirror_relpath)
        got = sha256_of(tmp)
        if got != sha256:
            if origin == url:
                todo = "retry, or put a good copy at %s" % dest
            else:
                todo = "replace the mirror's copy, or unset NANOGPT_DATA_MIRROR/--mirror to download it"
            raise PrepareError("%s from %s has sha256 %s, expected %s; %s" % (name, origin, got, sha256, todo))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _copy_from(url: str, out, mirror_file: str | None, mdir: str | None, relpath: str) -> str:
    """Copy the mirror's file, or else the download, into ``out``; return where it came from."""
    if mirror_file and os.path.isfile(mirror_file):
        with open(mirror_file, "rb") as f:
            shutil.copyfileobj(f, out)
        return mirror_file
    if mirror_file:
        _log("mirror %s has no %s: downloading %s" % (mdir, relpath, url))
    else:
        _log("downloading %s" % url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, out)
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        where = "no mirror holds it" if not mirror_file else "mirror %s lacks it too" % mdir
        raise PrepareError("download of %s failed (%s) and %s; offline, set NANOGPT_DATA_MIRROR or --mirror "
                           "to a folder with %s" % (url, reason, where, relpath)) from None
    return url
