"""The federation: the ServerApp (rounds, cohorts, evaluation, results) and the ClientApp (one
user per node), what travels between them, the checkpoint and each user's private store, user-level
differential privacy, Flower's aggregators, round selection and the run's verdict and files."""
