from engine_svc.server import main

main()
