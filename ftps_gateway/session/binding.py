"""Which data connections belong to a session: the address rule and the TLS rule.

RFC 4217 section 10 asks the server to make sure a data connection comes from the
client of its control connection. Two proofs exist: the peer's address, and the TLS
session the data connection resumes (each control session has a context of its own,
so a resumed session proves it came from this session's client; see
``tls.contexts``). The policy (``reuse``) says which proofs a partner's network and
user must give. Pure decisions; the protocol layer applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.config import RESUMING_POLICIES
from ftps_gateway.policy.netpolicy import TLSPolicyTable, strip_mapped

if TYPE_CHECKING:
    from ftps_gateway.config import UserSettings
    from ftps_gateway.policy.netpolicy import DataChannelPolicy


def is_session_peer(
    policy: DataChannelPolicy | None, peer_ip: str, client_ip: str, proxy_ip: str | None
) -> bool:
    """May a data connection from ``peer_ip`` belong to this session?

    The client's own address; and behind a PROXY-protocol balancer also the
    balancer's, which forwards the passive ports without a header: the balancer's
    address is every partner's, so only a resumption check can then tell them apart,
    and it is accepted only under a resuming policy. ``required-any-ip`` accepts any
    address and leaves it to the resumption check.
    """
    if policy is not None and policy.reuse == "required-any-ip":
        return True
    peer = strip_mapped(peer_ip)
    if peer == client_ip:
        return True
    return (
        proxy_ip is not None
        and peer == strip_mapped(proxy_ip)
        and policy is not None
        and policy.reuse in RESUMING_POLICIES
    )


def needs_resumption(policy: DataChannelPolicy | None) -> bool:
    """True if a data connection must resume the control session's TLS session."""
    return policy is not None and policy.reuse in RESUMING_POLICIES


def fails_the_transfer(peer_ip: str, client_ip: str) -> bool:
    """Does a refused data connection from ``peer_ip`` fail the partner's transfer?

    From the partner's own address it is the partner's client that failed (it cannot
    resume, or its TLS failed): say so at once (425). From another address (a
    balancer, a NAT pool) the refused peer may be a stranger, not the partner's
    client: it is closed alone and the port keeps listening for the partner's own.
    """
    return strip_mapped(peer_ip) == client_ip


@dataclass(frozen=True)
class UserBinding:
    """A logged-in user's data-connection policy."""

    policy: DataChannelPolicy
    lower_max_version: bool  # cap data connections below the network's maximum
    conflict: bool  # resumption required, but the data cap is below the control TLS


def user_binding(
    network: DataChannelPolicy, user: UserSettings, control_version: str
) -> UserBinding:
    """Refine the network's policy with the user's settings.

    A TLS 1.2 data connection cannot resume a TLS 1.3 session: with resumption
    required and a data cap below the control version, every transfer would be
    refused, which the operator must hear about (``conflict``).
    """
    policy = TLSPolicyTable.for_user(network, user)
    version = control_version.removeprefix("TLSv")
    return UserBinding(
        policy=policy,
        lower_max_version=policy.max_version < network.max_version,
        conflict=policy.reuse in RESUMING_POLICIES and policy.max_version < version,
    )
