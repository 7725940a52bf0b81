#!/usr/bin/env python3
"""Pretrain a backbone self-supervised on unlabelled thumbnails: python pretrain_thumbclassifier.py EXPERIMENT_FILE"""

from thumbclf.cli import pretrain_main

if __name__ == "__main__":
    pretrain_main()
