#!/usr/bin/env python3
"""Classify thumbnails or slides: python deploy_thumbclassifier.py EXPERIMENT_FILE"""

from thumbclf.cli import deploy_main

if __name__ == "__main__":
    deploy_main()
