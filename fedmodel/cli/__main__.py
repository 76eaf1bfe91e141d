"""`python -m fedmodel.cli`: the same entry point as the `fedmodel` script."""

from fedmodel.cli.main import main

main()
