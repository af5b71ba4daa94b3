"""Who is calling: bearer tokens from a file, and what each may see.

The token file holds one token per line, optionally followed by a name and the word `admin`:

    # token                              name     role
    3f9c2b...                            alice
    8d11e0...                            ops      admin

Blank lines and `#` comments are skipped. Tokens shorter than 16 characters are refused (they are guessable).
A job records the name of the token that created it; a token sees only its own jobs, an admin token sees all.
"""

from __future__ import annotations

import hmac
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False

    def can_access(self, owner: str) -> bool:
        return self.admin or owner == self.name


# Set by the authentication interceptor for the duration of one call; None when authentication is off.
current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)


class TokenTable:
    def __init__(self, tokens: dict[str, Principal]) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        tokens: dict[str, Principal] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            token, *rest = line.split()
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"{path}:{number}: tokens must be at least {MIN_TOKEN_LENGTH} characters")
            if len(rest) > 2 or (len(rest) == 2 and rest[1] != "admin"):
                raise ValueError(f"{path}:{number}: expected 'TOKEN [NAME] [admin]'")
            name = rest[0] if rest else f"token-{number}"
            tokens[token] = Principal(name=name, admin=len(rest) == 2)
        if not tokens:
            raise ValueError(f"{path}: no tokens")
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise FinetuneError(
                ErrorKind.UNAUTHENTICATED,
                "MISSING_TOKEN",
                "this server needs 'authorization: Bearer <token>' metadata",
            )
        found = None
        for token, principal in self._tokens.items():  # compare with every token in constant time
            if hmac.compare_digest(token.encode(), presented.strip().encode()):
                found = principal
        if found is None:
            raise FinetuneError(ErrorKind.UNAUTHENTICATED, "INVALID_TOKEN", "the bearer token is not valid")
        return found


def check_access(owner: str, what: str) -> None:
    """PERMISSION_DENIED unless the caller may see something owned by `owner` (always allowed without auth)."""
    principal = current_principal.get()
    if principal is not None and not principal.can_access(owner):
        raise FinetuneError(ErrorKind.PERMISSION_DENIED, "NOT_YOURS", f"{what} belongs to another token")


def caller_name() -> str:
    principal = current_principal.get()
    return principal.name if principal else ""


def visible_owner() -> str | None:
    """The owner to filter listings by: None (everything) without auth or for an admin."""
    principal = current_principal.get()
    return None if principal is None or principal.admin else principal.name
