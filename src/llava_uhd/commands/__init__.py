"""One module per ``llava-uhd`` subcommand (see :mod:`llava_uhd.cli`)."""
