"""`python -m bench`: the store benchmark; `python -m bench engine`: the engine benchmark;
`python -m bench feed`: Stream watchers (fan-out cost and lag)."""

import sys

if sys.argv[1:2] == ["engine"]:
    from bench.engine_bench import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["feed"]:
    from bench.feed_bench import main

    raise SystemExit(main(sys.argv[2:]))

from bench.store_bench import main

raise SystemExit(main())
