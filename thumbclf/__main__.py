"""python -m thumbclf: the same as the thumbclf command."""

from thumbclf.cli import command_main

if __name__ == "__main__":
    command_main()
