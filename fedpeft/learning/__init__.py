"""The learning side of one user: backbones and peft methods (and fedpeft's own bottleneck
adapters), local training and prediction, packed training of several users at once, and scores."""
