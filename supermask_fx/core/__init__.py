"""The pass: ``popupify`` (popup.py), the gate swapped into each weight-bearing module (gate.py), its
settings (config.py), weight distributions (initializers.py), mask recomputation (recompute.py), the
state_dict record that saves and checks a popupified model (state.py) and inspection (masks.py)."""
