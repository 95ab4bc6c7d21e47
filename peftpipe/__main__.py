"""``python -m peftpipe``: the same command line as the ``peftpipe`` script."""

from peftpipe import main

main()
