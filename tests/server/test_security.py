"""TLS, mutual TLS and bearer-token auth on a real server; tokens never reach the logs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from embserve.client import (
    Client,
    PermissionDenied,
    TlsConfig,
    Unauthenticated,
    Unavailable,
)
from embserve.embeddings import ServingModel
from tests.certs import make_pki
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]
FEATURES = {"user": [[1, 2], [3]]}


def test_tls_and_mutual_tls(tmp_path: Path, server_factory: Factory, small_serving: ServingModel) -> None:
    pki = make_pki(tmp_path)
    ca = pki["ca.pem"].read_bytes()
    tls = server_factory(small_serving, tls={"cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"])})
    with Client(tls.address, tls=TlsConfig(root_certificates=ca)) as client:
        assert client.lookup(FEATURES).batch_size == 2
    with Client(
        tls.address, tls=TlsConfig(root_certificates=pki["other-ca.pem"].read_bytes()), retry=None, timeout=3
    ) as client:
        with pytest.raises(Unavailable):  # the server's certificate is not trusted
            client.lookup(FEATURES)
    with Client(tls.address, retry=None, timeout=3) as client:
        with pytest.raises(Unavailable):  # plaintext against a TLS port
            client.health()

    mtls = server_factory(
        small_serving,
        tls={
            "cert_file": str(pki["server.pem"]),
            "key_file": str(pki["server.key"]),
            "client_ca_file": str(pki["ca.pem"]),
        },
    )
    good = TlsConfig(ca, pki["client.key"].read_bytes(), pki["client.pem"].read_bytes())
    with Client(mtls.address, tls=good) as client:
        assert client.lookup(FEATURES).batch_size == 2
    for tls_config in (
        TlsConfig(root_certificates=ca),  # no client certificate
        TlsConfig(ca, pki["client.key"].read_bytes(), pki["rogue.pem"].read_bytes()),  # signed by another CA
    ):
        with Client(mtls.address, tls=tls_config, retry=None, timeout=3) as client:
            with pytest.raises(Unavailable):
                client.lookup(FEATURES)


def test_bearer_tokens(
    tmp_path: Path, server_factory: Factory, small_serving: ServingModel, caplog: pytest.LogCaptureFixture
) -> None:
    secret, meta_only, lookup_only = "s3cr3t-token-ABC", "metadata-only-XYZ", "lookup-only-QRS"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# ranking services\n{secret} *\n{meta_only} GetModelMetadata\n{lookup_only} Lookup\n")
    caplog.set_level(logging.DEBUG)
    handle = server_factory(small_serving, auth={"tokens_file": str(tokens)})
    with Client(handle.address, token=secret) as client:
        assert client.lookup(FEATURES).batch_size == 2
    with Client(handle.address, retry=None) as client:
        assert client.health() == "SERVING"  # probes need no token
        with pytest.raises(Unauthenticated, match="missing 'authorization: Bearer <token>'"):
            client.metadata()
    with Client(handle.address, token="wrong", retry=None) as client:
        with pytest.raises(Unauthenticated, match="invalid token"):
            client.metadata()
    with Client(handle.address, token=meta_only, retry=None) as client:
        assert client.metadata().name == "small"
        with pytest.raises(PermissionDenied, match="token may not call Lookup"):  # Lookup or LookupStream
            client.lookup(FEATURES)
    with Client(handle.address, token=lookup_only, retry=None) as client:
        assert client.lookup(FEATURES).batch_size == 2  # the SDK does without the limits it may not read
    denied = [
        handle.metric("embserve_requests_total", {"method": m, "code": "PERMISSION_DENIED"})
        for m in ("Lookup", "LookupStream")
    ]
    assert sum(denied) == 1  # counted under the method the client used (LookupStream by default)
    assert handle.metric("embserve_requests_total", {"method": "GetModelMetadata", "code": "UNAUTHENTICATED"}) == 2
    assert secret not in caplog.text and meta_only not in caplog.text and lookup_only not in caplog.text


def test_bad_tokens_file_is_reported_without_the_token(tmp_path: Path) -> None:
    from embserve.server.security import load_tokens

    path = tmp_path / "tokens"
    path.write_text("topsecret Lookup,Explode\n")
    with pytest.raises(ValueError, match=r"tokens:1: unknown methods \['Explode'\]") as info:
        load_tokens(path)
    assert "topsecret" not in str(info.value)
    path.write_text("only-a-token\n")
    with pytest.raises(ValueError, match="expected '<token> <methods>'") as info:
        load_tokens(path)
    assert "only-a-token" not in str(info.value)
