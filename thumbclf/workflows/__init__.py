"""The workflows (train, deploy, pretrain, evaluate) and the run lifecycle: recipes that read
top to bottom, and the only code that reads the params objects."""
