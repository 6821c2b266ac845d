"""Mounts, permissions, resumable uploads and quotas on real FTPS sessions.

ftplib (``ReusingFTP_TLS``) drives the protocol; curl and lftp check that real
clients find the resume offset the way the README documents (SIZE of the target).
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ftps_gateway.ftp import replies
from support.control import exactly
from support.credentials import PASSWORD, PASSWORD_HASH
from support.gateway import RunningGateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

StartGateway = Callable[..., RunningGateway]

TREE = """partial_retention_seconds = 3600
[[groups]]
name = "finance"
[[groups.mounts]]
path = "/finance"
source = "shared/finance"
permissions = "read"
[[groups.mounts]]
path = "/outbound"
source = "shared/outbound/{user}"
permissions = "dropbox"

[[groups]]
name = "ops"
[[groups.mounts]]
path = "/finance/drop"
source = "shared/drop"
permissions = ["upload", "list"]

[[users]]
name = "acme"
password = "HASH"
groups = ["finance", "ops"]
[[users.mounts]]
path = "/a/b/deep"
source = "deep/{user}"
permissions = "read-write"
quota_bytes = 100000
quota_files = 3

[[users]]
name = "beta"
password = "HASH"
home = false
groups = ["finance"]
""".replace("HASH", PASSWORD_HASH)


@pytest.fixture
def tree(start_gateway: StartGateway) -> RunningGateway:
    """acme: home, /finance (read), /finance/drop, /outbound, /a/b/deep (quota)."""
    gw = start_gateway(users=TREE)
    (gw.root / "shared" / "finance").mkdir(parents=True)
    (gw.root / "shared" / "finance" / "q1.csv").write_bytes(b"q1 figures\n")
    return gw


def sha256(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def nlst(ftp: ftplib.FTP, path: str = "") -> list[str]:
    """Names in ``path`` (sorted)."""
    return sorted(
        os.path.basename(name) for name in ftp.nlst(*([path] if path else []))
    )


# --- the tree --------------------------------------------------------------------


def test_mount_points_are_listed_and_user_folders_created(tree: RunningGateway) -> None:
    """Mount points appear in their parent; {user} folders exist after login."""
    ftp = tree.client()
    assert nlst(ftp) == ["a", "finance", "outbound"]
    assert nlst(ftp, "/a") == ["b"]
    assert nlst(ftp, "/finance") == ["drop", "q1.csv"]
    assert (tree.root / "shared" / "outbound" / "acme").is_dir()
    assert (tree.root / "deep" / "acme").is_dir()
    facts = dict(ftp.mlsd("/finance"))
    assert facts["q1.csv"]["perm"] == "r"  # read: download only, no write/delete
    assert "c" in facts["drop"]["perm"]  # upload allowed in the nested dropbox
    ftp.cwd("/a/b/deep")
    assert ftp.pwd() == "/a/b/deep"
    ftp.quit()


def test_home_false_user_sees_only_mounts(tree: RunningGateway) -> None:
    """Without a home, / lists the mounts and accepts nothing else."""
    ftp = tree.client(user="beta")
    assert nlst(ftp) == ["finance", "outbound"]
    for command in ("MKD /x", "DELE /x"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.sendcmd(command)
    with pytest.raises(ftplib.error_perm, match="^550"):
        ftp.storbinary("STOR /x.txt", io.BytesIO(b"x"))
    assert not (tree.root / "home" / "beta").exists()
    ftp.quit()


def test_mount_points_cannot_be_changed_nor_renamed_across(
    tree: RunningGateway,
) -> None:
    """Mount points cannot be deleted, renamed or replaced; renames stay in a mount."""
    ftp = tree.client()
    for command in ("RMD /finance", "DELE /finance/drop", "RNFR /a/b/deep",
                    "MKD /finance", "RMD /a", "RNFR /a"):  # fmt: skip
        with pytest.raises(ftplib.error_perm, match=exactly(replies.MOUNT_POINT)):
            ftp.sendcmd(command)
    ftp.storbinary("STOR /a/b/deep/x.txt", io.BytesIO(b"x"))
    ftp.sendcmd("RNFR /a/b/deep/x.txt")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.ACROSS_MOUNTS)):
        ftp.sendcmd("RNTO /x.txt")
    ftp.rename("/a/b/deep/x.txt", "/a/b/deep/y.txt")
    assert (tree.root / "deep" / "acme" / "y.txt").read_bytes() == b"x"
    ftp.quit()


def test_no_escape_from_a_mount(tree: RunningGateway, tmp_path: Path) -> None:
    """.., absolute paths and symlinks (out, or into another mount) are refused."""
    finance = tree.root / "shared" / "finance"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (finance / "out").symlink_to(outside)
    (finance / "home").symlink_to(tree.home())
    (tree.home() / "mine.txt").write_text("mine")
    ftp = tree.client()
    ftp.cwd("/finance")
    for command in ("RETR out/secret", "RETR home/mine.txt", "CWD out", "SIZE home",
                    "MLST out", "RETR ../../../../etc/passwd"):  # fmt: skip
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.sendcmd(command)
    assert nlst(ftp) == ["drop", "q1.csv"]  # links out are not listed
    ftp.cwd("../../..")
    assert ftp.pwd() == "/"
    ftp.quit()


# --- the permission matrix -------------------------------------------------------

WORDS = ["list", "download", "upload", "overwrite", "delete", "rename", "mkdir"]


def _matrix_users() -> str:
    sections = []
    for word in [*WORDS, "upload+overwrite", "none"]:
        permissions = word.split("+") if word != "none" else []
        sections.append(
            f'[[users]]\nname = "u-{word.replace("+", "-")}"\n'
            f'password = "{PASSWORD_HASH}"\nhome = false\n'
            f'[[users.mounts]]\npath = "/m"\nsource = "m/{{user}}"\n'
            f"permissions = {permissions!r}\n".replace("'", '"')
        )
    return "\n".join(sections)


# command -> (the permissions that allow it (any one of them), the action)
MATRIX: dict[str, tuple[set[str], Callable[[ftplib.FTP], object]]] = {
    "LIST": ({"list"}, lambda f: f.retrlines("LIST /m", lambda _: None)),
    "NLST": ({"list"}, lambda f: f.nlst("/m")),
    "MLSD": ({"list"}, lambda f: list(f.mlsd("/m"))),
    "MLST": ({"list"}, lambda f: f.sendcmd("MLST /m/f.txt")),
    "SIZE": ({"list", "download"}, lambda f: f.sendcmd("SIZE /m/f.txt")),
    "MDTM": ({"list", "download"}, lambda f: f.sendcmd("MDTM /m/f.txt")),
    "RETR": ({"download"}, lambda f: f.retrbinary("RETR /m/f.txt", lambda _: None)),
    "STOR new": ({"upload", "upload+overwrite"},
                 lambda f: f.storbinary("STOR /m/new.txt", io.BytesIO(b"n"))),
    "STOR existing": ({"upload+overwrite"},
                      lambda f: f.storbinary("STOR /m/f.txt", io.BytesIO(b"n"))),
    "APPE existing": ({"upload+overwrite"},
                      lambda f: f.storbinary("APPE /m/f.txt", io.BytesIO(b"n"))),
    "DELE": ({"delete"}, lambda f: f.delete("/m/f.txt")),
    "RMD": ({"delete"}, lambda f: f.rmd("/m/d")),
    "RNFR/RNTO": ({"rename"}, lambda f: f.rename("/m/f.txt", "/m/g.txt")),
    "MKD": ({"mkdir"}, lambda f: f.mkd("/m/new")),
    "CWD": (set(WORDS) | {"upload+overwrite"}, lambda f: f.cwd("/m")),
}  # fmt: skip


def test_permission_matrix(start_gateway: StartGateway) -> None:
    """Every permission word allows exactly the commands it governs, on real sessions."""
    gw = start_gateway(users=_matrix_users())
    failures = []
    for word in [*WORDS, "upload+overwrite", "none"]:
        name = f"u-{word.replace('+', '-')}"
        ftp = gw.client(user=name)
        source = gw.root / "m" / name
        for command, (allowed_by, action) in MATRIX.items():
            shutil.rmtree(source)
            (source / "d").mkdir(parents=True)
            (source / "f.txt").write_bytes(b"file")
            ftp.cwd("/")
            ftp.voidcmd("TYPE I")  # SIZE is refused in ASCII mode, whatever the rights
            try:
                action(ftp)
                allowed = True
            except ftplib.error_perm as err:
                if str(err) not in (replies.DENIED, replies.NO_SIZE):
                    failures.append(f"{word} {command}: unexpected {err}")
                allowed = False
            if allowed != (word in allowed_by):
                failures.append(f"{word} {command}: allowed={allowed}")
        ftp.quit()
    assert failures == []


# --- resumable uploads -----------------------------------------------------------

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


def _killed_upload(gw: RunningGateway, path: str, data: bytes) -> None:
    """Send ``data`` to STOR ``path``, then reset the connection (no close_notify)."""
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd(f"STOR {path}")
    assert isinstance(conn, ssl.SSLSocket)
    conn.sendall(data)
    time.sleep(0.3)  # let the server write what arrived
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    with pytest.raises(ftplib.error_temp, match="^426"):
        ftp.voidresp()
    ftp.quit()


def _partials(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".ftps-upload-")]


def test_resume_after_killed_client_with_rest_and_appe(
    tree: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """An interrupted upload is kept hidden; SIZE gives the offset; REST+STOR and APPE
    finish it and the result (and the audit log's sha256 of it) is the whole file."""
    for verb in ("REST", "APPE"):
        name = f"resume-{verb}.bin"
        _killed_upload(tree, name, PAYLOAD[: 2 * 1024 * 1024])
        assert not (tree.home() / name).exists()
        assert len(_partials(tree.home())) == 1
        ftp = tree.client()
        assert name not in nlst(ftp)  # the partial is invisible
        ftp.voidcmd("TYPE I")
        offset = int(ftp.sendcmd(f"SIZE {name}").split()[1])
        assert 0 < offset <= 2 * 1024 * 1024
        rest = PAYLOAD[offset:]
        if verb == "REST":
            ftp.storbinary(f"STOR {name}", io.BytesIO(rest), rest=offset)
        else:
            ftp.storbinary(f"APPE {name}", io.BytesIO(rest))
        assert sha256((tree.home() / name).read_bytes()) == sha256(PAYLOAD)
        completed = [
            r for r in audit_records()
            if r["event"] == "upload_completed" and r["path"] == f"/{name}"
        ]  # fmt: skip
        assert [r["sha256"] for r in completed] == [sha256(PAYLOAD)]
        assert _partials(tree.home()) == []
        assert int(ftp.sendcmd(f"SIZE {name}").split()[1]) == len(PAYLOAD)
        ftp.quit()


def test_partial_belongs_to_its_user_and_rest_beyond_is_refused(
    tree: RunningGateway,
) -> None:
    """Another user does not see acme's partial; REST past it is 554, partial kept."""
    _killed_upload(tree, "/outbound/../finance/drop/d.bin", PAYLOAD[:500_000])
    drop = tree.root / "shared" / "drop"
    assert len(_partials(drop)) == 1
    ftp = tree.client()
    ftp.voidcmd("TYPE I")
    size = int(ftp.sendcmd("SIZE /finance/drop/d.bin").split()[1])
    ftp.sendcmd(f"REST {size + 1}")
    with pytest.raises(ftplib.error_perm, match="^554"):
        ftp.storbinary("STOR /finance/drop/d.bin", io.BytesIO(b"x"))
    assert _partials(drop)[0].stat().st_size == size
    ftp.quit()
    other = tree.client(user="beta")  # /finance/drop is not even in beta's tree
    with pytest.raises(ftplib.error_perm, match="^550"):
        other.sendcmd("SIZE /finance/drop/d.bin")
    other.quit()


def test_dropbox_size_tells_nothing_but_the_own_partial(tree: RunningGateway) -> None:
    """In a dropbox, SIZE answers only about one's own partial upload."""
    outbound = tree.root / "shared" / "outbound" / "acme"
    ftp = tree.client()
    ftp.storbinary("STOR /outbound/done.csv", io.BytesIO(b"delivered"))
    ftp.voidcmd("TYPE I")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.NO_SIZE)):
        ftp.sendcmd("SIZE /outbound/done.csv")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.DENIED)):
        ftp.nlst("/outbound")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.DENIED)):
        ftp.storbinary("STOR /outbound/done.csv", io.BytesIO(b"again"))  # no overwrite
    ftp.quit()
    _killed_upload(tree, "/outbound/big.bin", PAYLOAD[:300_000])
    ftp = tree.client()
    ftp.voidcmd("TYPE I")
    offset = int(ftp.sendcmd("SIZE /outbound/big.bin").split()[1])
    ftp.storbinary("APPE /outbound/big.bin", io.BytesIO(PAYLOAD[offset:]))
    assert sha256((outbound / "big.bin").read_bytes()) == sha256(PAYLOAD)
    ftp.quit()


# --- quotas ----------------------------------------------------------------------


def test_quota_refuses_with_452_and_leaves_nothing(tree: RunningGateway) -> None:
    """Bytes over the mount quota stop the upload (452); file count is enforced too."""
    deep = tree.root / "deep" / "acme"
    ftp = tree.client()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.OVER_QUOTA)):
        ftp.storbinary("STOR /a/b/deep/big.bin", io.BytesIO(os.urandom(150_000)))
    assert list(deep.iterdir()) == []
    for index in range(3):
        ftp.storbinary(f"STOR /a/b/deep/{index}.txt", io.BytesIO(b"x" * 10))
    with pytest.raises(ftplib.error_temp, match=exactly(replies.OVER_QUOTA)):
        ftp.storbinary("STOR /a/b/deep/3.txt", io.BytesIO(b"x"))
    ftp.storbinary("STOR /a/b/deep/0.txt", io.BytesIO(b"y" * 99_000))  # replace: room
    assert sorted(p.name for p in deep.iterdir()) == ["0.txt", "1.txt", "2.txt"]
    ftp.quit()


# --- real clients ----------------------------------------------------------------

CURL = shutil.which("curl")
LFTP = shutil.which("lftp")


@pytest.mark.clients
@pytest.mark.skipif(CURL is None, reason="curl binary not found on PATH")
def test_curl_resumes_with_dash_c(tree: RunningGateway, tmp_path: Path) -> None:
    """curl -C - learns the offset from SIZE and finishes the upload intact."""
    assert CURL is not None
    _killed_upload(tree, "curl.bin", PAYLOAD[:1_000_000])
    local = tmp_path / "curl.bin"
    local.write_bytes(PAYLOAD)
    credentials = tmp_path / "curl.conf"
    credentials.write_text(f'user = "acme:{PASSWORD}"\n')
    result = subprocess.run(
        [CURL, "--silent", "--show-error", "--verbose", "--ssl-reqd",
         "--cacert", str(tree.ca_file), "--config", str(credentials),
         "-C", "-", "-T", str(local), f"ftp://{tree.host}:{tree.port}/curl.bin"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "SIZE curl.bin" in result.stderr
    assert sha256((tree.home() / "curl.bin").read_bytes()) == sha256(PAYLOAD)
    assert _partials(tree.home()) == []


@pytest.mark.clients
@pytest.mark.skipif(LFTP is None, reason="lftp binary not found on PATH")
def test_lftp_reput_resumes(tree: RunningGateway, tmp_path: Path) -> None:
    """lftp reput (put -c) learns the offset from SIZE and finishes the upload."""
    assert LFTP is not None
    _killed_upload(tree, "lftp.bin", PAYLOAD[:1_000_000])
    local = tmp_path / "lftp.bin"
    local.write_bytes(PAYLOAD)
    script = tmp_path / "script.lftp"
    script.write_text(
        "set ftp:ssl-force true\nset ftp:ssl-protect-data true\n"
        f"set ssl:ca-file {tree.ca_file}\nset net:max-retries 1\n"
        "set ftp:fix-pasv-address no\ndebug 5\n"
        f"open -u acme,'{PASSWORD}' ftp://{tree.host}:{tree.port}\n"
        f"reput {local} -o lftp.bin\nbye\n"
    )
    result = subprocess.run([LFTP, "-f", str(script)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "SIZE lftp.bin" in result.stderr
    assert "REST " in result.stderr or "APPE " in result.stderr
    assert sha256((tree.home() / "lftp.bin").read_bytes()) == sha256(PAYLOAD)
