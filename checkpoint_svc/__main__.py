"""`python -m checkpoint_svc [flags]` serves; `python -m checkpoint_svc migrate [flags]` only
brings the database's schema to the newest revision and exits (docs/operations.md#upgrading);
`python -m checkpoint_svc new-key [ID]` prints a key ring entry and `python -m checkpoint_svc
reseal [flags]` seals every stored value again with the newest key (docs/security.md)."""

import sys

from workflow_rpc.arenas import limit_malloc_arenas

limit_malloc_arenas()  # before gRPC (or anything else) starts a thread

if sys.argv[1:2] == ["migrate"]:
    from checkpoint_svc.server import migrate_main

    migrate_main(sys.argv[2:])
elif sys.argv[1:2] == ["new-key"]:
    from checkpoint_svc.server import new_key_main

    new_key_main(sys.argv[2:])
elif sys.argv[1:2] == ["reseal"]:
    from checkpoint_svc.server import reseal_main

    reseal_main(sys.argv[2:])
else:
    from checkpoint_svc.server import main

    main()
