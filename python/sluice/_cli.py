"""The `sluice` command that the wheel installs: build/sluice's commands, run by sluice._C in
this process, with parquet / Arrow sources of `sluice pack` read by sluice._arrow."""

import signal
import sys


def main() -> None:
    # As a C program: Ctrl-C ends the command (bench and serve take it themselves), and a
    # closed pipe (`sluice order ... | head`) ends it quietly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from . import _C
    from ._arrow import pack_command

    sys.exit(_C.cli(["sluice", *sys.argv[1:]], pack_command))


if __name__ == "__main__":
    main()
