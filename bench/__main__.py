"""`python -m bench`: the store benchmark; `python -m bench engine`: the engine benchmark."""

import sys

if sys.argv[1:2] == ["engine"]:
    from bench.engine_bench import main

    raise SystemExit(main(sys.argv[2:]))

from bench.store_bench import main

raise SystemExit(main())
