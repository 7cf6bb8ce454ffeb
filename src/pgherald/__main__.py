from pgherald.cli import main

main()
