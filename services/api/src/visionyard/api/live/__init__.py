"""Live job feeds over WebSocket: `endpoints` (the sockets), `feed` (one client's feeds), `hub` (one shared
feed per job), `batch` (batched frames), `page` (browser pages that reopen their socket), `adapters` (NATS)."""
