#!/usr/bin/env python3
"""Train a slide-thumbnail classifier: python train_thumbclassifier.py EXPERIMENT_FILE"""

from thumbclf.cli import train_main

if __name__ == "__main__":
    train_main()
