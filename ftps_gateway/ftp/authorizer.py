"""pyftpdlib's authorizer interface, answered from the gateway's own user table.

Password checks do not go through here: the control handler verifies argon2id hashes
off the IO loop (``session.login.LoginGate``). What remains is pyftpdlib asking
which permissions a logged-in user has. Every path it asks about has already been
mapped through the user's mount table and checked against that mount's permissions.
"""

from __future__ import annotations

from pyftpdlib.authorizers import AuthenticationFailed

from ftps_gateway.ftp import replies

# Every letter pyftpdlib checks (e=CWD l=LIST r=RETR a=APPE d=DELE/RMD f=RNFR/RNTO
# m=MKD w=STOR T=MFMT): the real decision is made before pyftpdlib asks, on the
# virtual path and its mount's permission words (session.fileaccess). No "M"
# (SITE CHMOD): partners have no business with Unix modes.
SESSION_PERMISSIONS = "elradfmwT"


class GatewayAuthorizer:
    """What pyftpdlib asks of an authorizer; the user table lives in the config."""

    def validate_authentication(
        self, username: str, password: str, handler: object
    ) -> None:
        """Never used: login is asynchronous (see module docstring)."""
        raise AuthenticationFailed("Authentication failed.")

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        """Letters pyftpdlib checks after the session's own decision allowed it.

        Only a logged-in session asks, and its user was found at login.
        """
        return perm in SESSION_PERMISSIONS

    def get_perms(self, username: str) -> str:
        """Unused for facts: GatewayFS.format_mlsx computes them per mount."""
        return SESSION_PERMISSIONS

    def get_msg_login(self, username: str) -> str:
        """The 230 text: no user details."""
        return replies.LOGIN_OK_TEXT

    def get_msg_quit(self, username: str) -> str:
        """The 221 text."""
        return replies.QUIT_TEXT

    def impersonate_user(self, username: str, password: str) -> None:
        """All users share the server's OS identity; isolation is by path."""

    def terminate_impersonation(self, username: str) -> None:
        """See ``impersonate_user``."""
