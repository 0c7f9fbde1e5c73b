"""Text classification on the served base model: a classifier is a LoRA adapter, a linear head and its labels."""
