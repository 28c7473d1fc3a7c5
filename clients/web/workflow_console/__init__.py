"""The web console: runs, workflows and live progress in a browser (docs/console.md)."""
