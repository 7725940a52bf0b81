"""What comes out: metrics, the confusion layout, plots, the report page, Grad-CAM figures,
evaluation of a predictions table, sorted copies."""
