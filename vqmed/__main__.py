"""Allows ``python -m vqmed ...`` (and ``torchrun -m vqmed pretrain ...``)."""

from vqmed.cli import main

if __name__ == "__main__":
    main()
