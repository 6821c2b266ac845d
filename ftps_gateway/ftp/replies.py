"""Every reply text the gateway writes itself, by name (tests import these).

Replies that pyftpdlib writes unchanged (``226 Transfer complete.``, ``250 ...``) are
not repeated here. Texts are deliberately generic: the client learns that something
was refused, the audit log learns why.

Each constant is a whole RFC 959 reply line (code, space or dash, text), with
``str.format`` fields where it carries a value, or a dict of such lines. A name
ending in ``_TEXT`` is the text alone, for pyftpdlib to put its code in front.
No other module of ``ftp/``, ``session/`` or ``service/`` spells a reply out
(``tests/unit/test_replies.py`` reads their source to check).
"""

from __future__ import annotations

from typing import Final

# --- RFC 4217: TLS on the control channel and PROT P for data
AUTH_OK: Final = "234 AUTH TLS successful."
AUTH_ALREADY: Final = "503 Already using TLS."
AUTH_UNSUPPORTED: Final = "504 Unsupported security mechanism; use AUTH TLS."
PBSZ_OK: Final = "200 PBSZ=0 successful."
PBSZ_NEEDS_TLS: Final = "503 PBSZ not allowed on insecure control connection."
PROT_NEEDS_TLS: Final = "503 PROT not allowed on insecure control connection."
PROT_NEEDS_PBSZ: Final = "503 You must issue the PBSZ command prior to PROT."
PROT_PRIVATE: Final = "200 Protection set to Private."
PROT_C_REFUSED: Final = "534 PROT C refused: data connections must be encrypted."
PROT_UNSUPPORTED: Final = "536 PROT {level} not supported; use PROT P."  # S or E
PROT_UNKNOWN: Final = "504 Unknown protection level; use PROT P."
CCC_NEEDS_TLS: Final = "533 CCC not allowed on insecure control connection."
CCC_REFUSED: Final = "534 CCC refused: the control connection stays encrypted."
TLS_FIRST: Final = "530 Send AUTH TLS first."
CLEAR_TEXT_LOGIN: Final = "530 Clear-text login refused: send AUTH TLS first."
PROT_P_REQUIRED: Final = (
    "521 Data connections must be encrypted: send PBSZ 0 and PROT P."
)

# --- command framing
COMMAND_TOO_LONG: Final = "500 Command too long."
CONTROL_CHARACTERS: Final = "501 Command contains CR or LF."
NOT_UNDERSTOOD: Final = '500 Command "{command}" not understood.'
NOT_IMPLEMENTED: Final = "502 {command} not supported."

# --- admission and session life
LIMIT_REPLIES: Final = {
    "limit-total": "421 Too many sessions; try again later.",
    "limit-per-ip": "421 Too many sessions from your address; try again later.",
    "limit-per-user": "421 Too many sessions for this user; try again later.",
    "draining": "421 Service restarting; try again shortly.",
    # A cluster node without Redis, cluster.on_unavailable = "refuse".
    "cluster-unavailable": "421 Service temporarily unavailable; try again later.",
}
# Closed before login to make room (server.max_unauthenticated); a fresh connection
# that logs in promptly gets in.
EVICTED: Final = "421 Too many connections waiting to log in; try again."
SHUTDOWN: Final = "421 Service restarting; please reconnect."
LOGIN_TIMEOUT: Final = "421 Login timed out; closing control connection."

# --- login
LOGIN_FIRST: Final = "530 Log in with USER and PASS first."
USER_FIRST: Final = "503 Login with USER first."
ALREADY_LOGGED_IN: Final = "503 Already logged in; reconnect to log in as another user."
ALREADY_AUTHENTICATED: Final = "503 User already authenticated."
LOGIN_FAILED: Final = "530 Authentication failed."
LOGIN_FAILED_CLOSING: Final = "530 Authentication failed. Disconnecting."
LOGIN_OK_TEXT: Final = "Login successful."  # pyftpdlib prefixes 230
# The login queue refused the attempt unverified (session.loginqueue); 421 closes.
LOGIN_QUEUE_REPLIES: Final = {
    "login-queue-full": "421 Too many logins in progress; try again later.",
    "login-queue-address": "421 Too many logins from your address; try again later.",
}
QUIT_TEXT: Final = "Goodbye."  # pyftpdlib prefixes 221

# --- data connections
NO_DATA_PATH: Final = "425 Use PASV or EPSV first."
NOT_RESUMED: Final = (
    "425 Can't open data connection: TLS session of data connection not resumed."
)
DATA_TLS_FAILED: Final = "425 Can't open data connection: TLS negotiation failed."
DATA_TIMEOUT: Final = "425 Can't open data connection: timed out."
PASSIVE_EXHAUSTED: Final = "425 Can't open data connection: no passive port free."
# One account, or one client address, holds its share of the passive range already.
PASSIVE_LIMITS: Final = {
    "passive-limit-per-user": (
        "425 Can't open data connection: too many passive ports held by this user."
    ),
    "passive-limit-per-ip": (
        "425 Can't open data connection: too many passive ports held from your address."
    ),
}
PASSIVE_NO_ADDRESS: Final = "425 Can't open data connection; use EPSV."
# PORT/EPRT: not supported (docs/decisions/0009-active-mode.md).
ACTIVE_UNSUPPORTED: Final = "502 Active mode is not supported; use PASV or EPSV."
PASV: Final = "227 Entering Passive Mode ({address},{high},{low})."
EPSV: Final = "229 Entering Extended Passive Mode (|||{port}|)."

# --- paths and permissions
INVALID_PATH: Final = "550 Invalid path."
DENIED: Final = "550 Permission denied."
MOUNT_POINT: Final = "550 A mounted folder cannot be changed."
ACROSS_MOUNTS: Final = (
    "550 Cannot rename across mounted folders; upload a copy instead."
)
NO_SIZE: Final = "550 Could not get file size."
# RFC 3659 section 7.2: MLSD of a missing name is 550 (rclone then creates the
# folder); 501 only when the name exists and is not a folder.
NO_SUCH_FOLDER: Final = "550 No such directory."
NOT_A_FOLDER: Final = "501 Not a directory."
SIZE: Final = "213 {size}"

# --- listings (produced off the IO loop; the texts pyftpdlib used)
LISTING_FAILED: Final = "550 {reason}."  # the OS's words: "No such file or directory"
STATUS_HEAD: Final = '213-Status of "{path}":'
STATUS_END: Final = "213 End of status."
FILE_WORK_BUSY: Final = "450 Server busy; try again shortly."  # file-work pool full

# --- uploads
OVER_QUOTA: Final = "452 Quota exceeded; upload not stored."
STORAGE_FULL: Final = "452 Insufficient storage space."
APPE_AFTER_REST: Final = "450 Can't APPE while REST request is pending."
UPLOAD_BUSY: Final = "450 This file is being uploaded by another session."
RESTART_BEYOND_DATA: Final = "554 Restart position beyond the data there is to resume."
NOT_A_FILE: Final = "550 Not a file."
CANNOT_CREATE: Final = "550 Can't create file."
DATA_ALREADY_OPEN: Final = "125 Data connection already open. Transfer starting."
# A transfer command while another transfer owns the data path (datapath.transfer_busy).
TRANSFER_IN_PROGRESS: Final = "450 Another transfer is in progress on this session."
OPENING_DATA: Final = "150 File status okay. About to open data connection."
UPLOAD_CUT: Final = "426 Connection closed; transfer aborted."
TRANSFER_ABORTED: Final = "426 Transfer aborted."
UPLOAD_NAME_TAKEN: Final = "550 File exists; upload not stored."
UPLOAD_NOT_STORED: Final = "451 Local error: upload not stored."

# --- file digests: HASH (draft-bryan-ftpext-hash-02 sections 3, 3.1, 3.2, 3.5) and
# the X* commands as ProFTPD's mod_digest answers them (contrib/mod_digest.c)
HASH_FEATURE_TEXT: Final = (
    "HASH {algorithms}"  # a FEAT line: "HASH SHA-256*;SHA-512;..."
)
HASH_OK: Final = "213 {algorithm} {start}-{end} {digest} {path}"
DIGEST_OK: Final = "213 {digest}"
HASH_ALGORITHM: Final = "200 {algorithm}"
HASH_UNKNOWN_ALGORITHM: Final = "501 Unknown algorithm, current selection not changed."
HASH_OPTS_SYNTAX: Final = "501 OPTS HASH: wrong number of parameters."
DIGEST_SYNTAX: Final = "501 Syntax: {command} pathname [start end]."
DIGEST_UPLOADING: Final = "450 File is being uploaded; try again when it is complete."
DIGEST_BUSY: Final = "450 Too many digests being computed; try again later."
NO_SUCH_FILE: Final = "550 No such file."
HASH_NOT_A_FILE: Final = "553 Not a regular file."
DIGEST_NOT_A_FILE: Final = "550 Not a regular file."
DIGEST_BAD_RANGE: Final = "501 Invalid range: need start <= end <= file size."
DIGEST_FAILED: Final = "550 Could not read the file."

# --- diagnostics
DIAG_HEAD: Final = "200-Diagnostics: what the server sees"
DIAG_END: Final = "200 End of diagnostics."
