"""``python -m patchmosaic``: the same command line as the ``patchmosaic`` script."""

from patchmosaic.cli import main

if __name__ == "__main__":
    main()
