"""``--kv-remote-url``: parsing and redaction, with no import of torch or the Redis client (the
engine's config checks the URL when it is built, the CLI before anything starts)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from kvbaton.errors import ConfigError

REMOTE_PASSWORD_ENV = "KVBATON_KV_REMOTE_PASSWORD"
REMOTE_SCHEMES = ("redis", "rediss")


def check_namespace(namespace: str) -> None:
    """ConfigError unless ``namespace`` (``--kv-remote-namespace``) can prefix keys."""
    if not namespace or any(c.isspace() for c in namespace):
        raise ConfigError("kv_remote_namespace", f"must be non-empty with no spaces, got {namespace!r}")


@dataclass(frozen=True)
class RemoteURL:
    """A parsed ``--kv-remote-url``: where the server is, and the password if the URL had one."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @property
    def redacted(self) -> str:
        """The URL with no password: what logs and reprs show."""
        user = f"{self.username}:***@" if self.username else ("***@" if self.password else "")
        return f"{self.scheme}://{user}{self.host}:{self.port}/{self.db}"

    def without_password(self) -> str:
        netloc = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit((self.scheme, f"{netloc}{host}:{self.port}", f"/{self.db}", "", ""))


def parse_remote_url(url: str, field: str = "kv_remote_url") -> RemoteURL:
    """``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://`` for TLS); ConfigError
    naming ``field`` when it is not one. The error never repeats the password."""
    def bad(why: str) -> ConfigError:
        return ConfigError(field, f"{why}; expected redis://[:PASSWORD@]HOST:PORT/DB or rediss://...")

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise bad(f"not a URL ({e})") from None
    if parts.scheme not in REMOTE_SCHEMES:
        raise bad(f"unsupported scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if not parts.hostname:
        raise bad("no host")
    if parts.query or parts.fragment:
        raise bad("query strings and fragments are not supported")
    path = parts.path.lstrip("/")
    if path and not path.isdigit():
        raise bad(f"the database must be a number, got {path!r}")
    db = int(path) if path else 0
    if not 0 <= db <= 15:  # Redis's default `databases 16`
        raise bad(f"the database must be 0..15, got {db}")
    return RemoteURL(parts.scheme, parts.hostname, port or 6379, db, parts.username or None, parts.password or None)
