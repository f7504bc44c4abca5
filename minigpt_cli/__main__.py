from minigpt_cli.cli import main

main()
