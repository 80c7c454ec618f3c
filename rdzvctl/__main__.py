from rdzvctl.cli.entry import main

main()
