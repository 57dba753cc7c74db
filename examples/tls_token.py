"""TLS with a private CA, a bearer token, and optionally a client certificate (mutual TLS).

    embserve serve --tls-cert server.pem --tls-key server.key --auth-tokens-file tokens.txt   # lines: <token> <methods|*>
    python examples/tls_token.py localhost:50051 --ca ca.pem --token-file my-token.txt
    python examples/tls_token.py localhost:50051 --ca ca.pem --token-file my-token.txt --cert client.pem --key client.key

The token is read from a file so that it never shows in the process list or shell history.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embserve.client import Client, TlsConfig

from _print import print_lookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="server host:port; the host must match the server certificate")
    parser.add_argument("--ca", required=True, help="PEM CA certificate that signed the server's certificate")
    parser.add_argument("--token-file", required=True, help="file holding the bearer token")
    parser.add_argument("--cert", help="PEM client certificate chain (mutual TLS)")
    parser.add_argument("--key", help="PEM client private key (mutual TLS)")
    parser.add_argument("--feature", default="user_id", help="table to look up (default: user_id)")
    args = parser.parse_args()

    tls = TlsConfig(
        root_certificates=Path(args.ca).read_bytes(),
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
        private_key=Path(args.key).read_bytes() if args.key else None,
    )
    token = Path(args.token_file).read_text().strip()
    with Client(args.address, tls=tls, token=token, timeout=10) as client:
        print(f"health: {client.health()}")
        features = {args.feature: [[1, 2, 3]]}
        result = client.lookup(features)
        print_lookup("tls_token", features, None, result.keys, result.embeddings, result.model_version)


if __name__ == "__main__":
    main()
