"""Utilities shared by the recipes: config, data, models, engine, checkpoint, tracking, doctor.

Kept free of imports here so that ``python3 -m shared.bootstrap`` runs before
anything is installed.
"""
