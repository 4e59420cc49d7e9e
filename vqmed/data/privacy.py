"""Salted, one-way ids for DICOM studies, series and patients.

Raw DICOM identifiers (StudyInstanceUID, PatientID, ...) never leave the data loader: manifests hold
``HMAC-SHA256(salt, kind + ":" + value)`` truncated to 16 hex digits. The salt is, in order:

1. the ``salt`` argument of :func:`vqmed.data.build_manifest` (CLI ``--salt``);
2. the environment variable ``VQMED_ID_SALT``;
3. a per-user random salt created once in ``$XDG_CONFIG_HOME/vqmed/id_salt`` (default
   ``~/.config/vqmed/id_salt``, mode 0600) and reused afterwards.

Keep the salt private: with it, anyone holding a candidate UID can test whether it is in a manifest.
Share it only with people who must rebuild manifests with identical ids (e.g. the same team).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SALT_ENV = "VQMED_ID_SALT"


def salt_file() -> Path:
    """Where the per-user random salt lives (``$XDG_CONFIG_HOME/vqmed/id_salt``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vqmed" / "id_salt"


def resolve_salt(salt: str | None = None) -> str:
    """Return the salt to use: ``salt``, else ``$VQMED_ID_SALT``, else the per-user salt file
    (created on first use with 256 random bits; never overwritten)."""
    if salt:
        return salt
    env = os.environ.get(SALT_ENV)
    if env:
        return env
    path = salt_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a private temp file, then hard-link it into place: the link is atomic and fails if
        # another process won the race, so every process ends up reading the same complete salt.
        tmp = path.with_name(f".id_salt.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"salt file {path} is empty; delete it to create a new one or set {SALT_ENV}")
    return value


def salted_id(kind: str, value: str, salt: str) -> str:
    """One-way id for ``value`` (e.g. a StudyInstanceUID); ``kind`` separates the namespaces so the
    same string hashed as a patient and as a study gives different ids."""
    digest = hmac.new(salt.encode("utf-8"), f"{kind}:{value}".encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:16]
