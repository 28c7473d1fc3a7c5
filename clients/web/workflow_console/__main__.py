"""`python -m workflow_console --engine ADDR --listen 127.0.0.1:8080` (docs/console.md)."""

from workflow_console.server import main

main()
