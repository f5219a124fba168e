"""Discovery: which parameters a model uses as weights, read from its torch.fx or torch.export graph
(discover.py, the rule in rule.py, example inputs for Hugging Face and timm models in example_inputs.py)."""
