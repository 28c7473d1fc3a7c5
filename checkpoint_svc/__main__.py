from checkpoint_svc.server import main

main()
