"""What is saved apart from the model: subnetwork files (subnetwork.py, mask_codec.py),
the plain-model export (materialize.py), atomic writes (atomic.py)."""
