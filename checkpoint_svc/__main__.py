from workflow_rpc.arenas import limit_malloc_arenas

limit_malloc_arenas()  # before gRPC (or anything else) starts a thread

from checkpoint_svc.server import main  # noqa: E402

main()
