"""The trainer's HTTP server and what only it uses: publish jobs, uploads, events, metrics, request schemas."""
