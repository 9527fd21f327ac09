"""Federated long-tailed learning: client splits, FedLoGe, and the engines that run it."""
