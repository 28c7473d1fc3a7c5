"""The workflow engine: executes workflow DAGs; every byte of run state lives in checkpoint_svc."""
