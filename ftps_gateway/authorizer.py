"""pyftpdlib's authorizer interface, answered from the gateway's own user table.

Password checks do not go through here: the control handler verifies argon2id hashes
off the IO loop (``handler.ControlHandler.ftp_PASS``). What remains is pyftpdlib asking
which permissions a logged-in user has. Every path it asks about has already been
confined to the user's home by ``filesystem.GatewayFS``.
"""

from __future__ import annotations

from pyftpdlib.authorizers import AuthenticationFailed

# e=CWD l=LIST r=RETR d=DELE/RMD f=RNFR/RNTO m=MKD w=STOR T=MFMT.
# No "a" (APPE) and no "M" (SITE CHMOD): atomic uploads replace whole files, and
# partners have no business with Unix modes.
HOME_PERMISSIONS = "elrdfmwT"


class GatewayAuthorizer:
    """Read-only view pyftpdlib needs; the user table lives in the config."""

    def __init__(self, usernames: frozenset[str]) -> None:
        self._usernames = usernames

    def validate_authentication(
        self, username: str, password: str, handler: object
    ) -> None:
        """Never used: login is asynchronous (see module docstring)."""
        raise AuthenticationFailed("Authentication failed.")

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        """Permission ``perm`` inside the home (the path is already confined)."""
        return username in self._usernames and perm in HOME_PERMISSIONS

    def get_perms(self, username: str) -> str:
        """The MLSD ``perm`` fact source."""
        return HOME_PERMISSIONS if username in self._usernames else ""

    def get_msg_login(self, username: str) -> str:
        """230 text: no user details."""
        return "Login successful."

    def get_msg_quit(self, username: str) -> str:
        """221 text."""
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        """All users share the server's OS identity; isolation is by path."""

    def terminate_impersonation(self, username: str) -> None:
        """See ``impersonate_user``."""
