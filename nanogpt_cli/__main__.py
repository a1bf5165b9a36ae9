"""`python -m nanogpt_cli ...` and `torchrun -m nanogpt_cli train ...`."""

from nanogpt_cli.cli import main

if __name__ == "__main__":
    main()
