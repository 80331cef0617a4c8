"""`python -m zcore.cli`: the `zcore` command."""

from zcore.cli import main

if __name__ == "__main__":
    main()
