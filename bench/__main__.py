"""`python -m bench`: the store benchmark (checkpoint_svc vs LangGraph's AsyncPostgresSaver)."""

from bench.store_bench import main

raise SystemExit(main())
