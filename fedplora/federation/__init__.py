"""Flower wiring: ServerApp, ClientApp, the heterogeneous-rank strategy, simulation and deployment."""
