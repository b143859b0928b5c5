"""Settings every service shares: production refuses a NATS connection without credentials or TLS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from visionyard.shared.bus import Bus
from visionyard.shared.config import ServiceSettings, server_urls, unsafe_nats_urls
from visionyard.shared.natsserver import NatsServer


def test_a_cluster_url_lists_its_servers() -> None:
    assert server_urls("nats://a:4222, nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    assert server_urls("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]


def test_production_refuses_nats_without_credentials_and_plaintext_beyond_loopback() -> None:
    with pytest.raises(ValidationError, match="VISIONYARD_NATS_URL: nats://127.0.0.1:4222 has no credentials"):
        ServiceSettings(mode="production")
    with pytest.raises(ValidationError, match="nats://nats-2:4222 is plaintext beyond loopback"):
        ServiceSettings(mode="production", nats_url="tls://u:p@nats-1:4222,nats://u:p@nats-2:4222")
    # The refusal never echoes the password it found.
    with pytest.raises(ValidationError) as refused:
        ServiceSettings(mode="production", nats_url="nats://u:hunter2@nats-1:4222")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("url, allow_plaintext", [
    ("nats://svc:secret@127.0.0.1:4222", False),
    ("tls://svc:secret@nats-1:4222,tls://token@nats-2:4222", False),
    ("nats://svc:secret@nats-1:4222,nats://svc:secret@nats-2:4222", True),
])
def test_production_accepts_credentials_over_tls_loopback_or_a_vouched_private_network(url: str, allow_plaintext: bool) -> None:
    assert unsafe_nats_urls(url, allow_plaintext=allow_plaintext) == []
    ServiceSettings(mode="production", nats_url=url, nats_allow_plaintext=allow_plaintext)


def test_embedded_mode_keeps_the_open_local_default() -> None:
    assert ServiceSettings().nats_url == "nats://127.0.0.1:4222"


@pytest.mark.integration
async def test_the_bus_connects_to_a_comma_separated_cluster_url(nats_server: NatsServer) -> None:
    # Before server_urls, nats-py parsed the whole list as one URL and refused it.
    bus = await Bus.connect(f"{nats_server.url},{nats_server.url}", service="test")
    try:
        assert bus.nc.is_connected
    finally:
        await bus.close()
