from ampcompare.cli import main

main()
