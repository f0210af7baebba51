"""Prometheus metrics of the federation, on the admin app's ``/metrics`` (with the ``metrics``
plugin).  Peer labels come from the config, so their number is bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from qpc_federation.service import Federation


class FederationCollector:
    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def collect(self) -> Iterator[Metric]:
        fed = self.fed
        st = fed.stats
        relayed = CounterMetricFamily(
            "federation_relayed_messages_total",
            "Messages this server delivered to the peer that hosts their recipient (accepted "
            "there; duplicates included)", labels=["peer"])
        received = CounterMetricFamily(
            "federation_received_messages_total",
            "Messages peers relayed to this server and it accepted", labels=["peer"])
        errors = CounterMetricFamily(
            "federation_peer_errors_total",
            "Calls to a peer that failed: reason unavailable (unreachable, timed out, "
            "connection lost) or refused (any other error status except not found)",
            labels=["peer", "reason"])
        connected = GaugeMetricFamily(
            "federation_peer_connected",
            "1 while this server holds an open connection to the peer", labels=["peer"])
        for peer in fed.peers:
            relayed.add_metric([peer], st.relayed.get(peer, 0))
            received.add_metric([peer], st.received.get(peer, 0))
            for reason in ("unavailable", "refused"):
                errors.add_metric([peer, reason], st.errors.get((peer, reason), 0))
            connected.add_metric([peer], 1.0 if fed.connected(peer) else 0.0)
        yield relayed
        yield received
        yield errors
        yield connected
        crl = fed.tls.crl
        if crl is not None:
            if crl.next_update is not None:
                yield GaugeMetricFamily(
                    "federation_crl_next_update_timestamp_seconds",
                    "When the revocation list in use is due to be replaced (unix seconds); "
                    "past it the list is still used", value=crl.next_update.timestamp())
            yield GaugeMetricFamily("federation_crl_revoked_certificates",
                                    "Certificates the revocation list in use revokes",
                                    value=len(crl.serials))
        yield GaugeMetricFamily("federation_routes",
                                "Identity keys whose home server (a peer) is known",
                                value=len(fed.routes))
