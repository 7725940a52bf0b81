"""Networks: models and the model file, the training loop, augmentation, calibration,
familiarity, self-supervised pretraining (BYOL)."""
