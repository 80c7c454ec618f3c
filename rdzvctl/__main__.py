from rdzvctl.cli.main import main

main()
