"""Caravan insurance buyer prediction: prepare, train and evaluate stages."""
