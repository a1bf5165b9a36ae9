"""nanogpt-cli: train, finetune, sample, evaluate and benchmark GPT-2-class models with one command, `ngpt`."""

__version__ = "0.1.0"
