"""The Unix-socket JSON-RPC 2.0 front-end."""
