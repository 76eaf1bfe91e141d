"""FedModel: federated, differentially private training on Flower and Opacus."""

__version__ = "0.1.0"
