"""The GCN (net.py), its data (data_loader.py, transforms.py, datasets/), metrics and pictures."""

IGNORE_INDEX = 255  # the void label of every data set: ignored by the loss and the metrics
